"""Every start-time check, in one place: what `duet config validate` runs (`nginx -t` for duet)
and what the follower and planner refuse to start on. Each check returns the problems it
found, naming the key, the file or the input and the reason; an empty list means go."""

from __future__ import annotations

from pathlib import Path

from runtime.bundle import BundleError, load_bundle
from runtime.config import DuetConfig


def bundle_problems(cfg: DuetConfig) -> list[str]:
    """The bundle verifies (hashes, signature) and its contract fits this robot."""
    try:
        load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
    except BundleError as exc:
        return [f"bundle.path: {exc}"]
    return []


def device_problems(cfg: DuetConfig) -> list[str]:
    """Devices the config names exist (a sim robot's devices appear when the sim starts)."""
    out = []
    from runtime.buses import bus_sections

    for section, _ in bus_sections(cfg):
        device = getattr(section, "device", None)
        if device is not None and device != "sim" and not Path(device).exists():
            out.append(f"bus.device: {device} does not exist (adapter unplugged? udev rule?)")
    camera = cfg.planner.camera
    if camera.kind == "v4l2" and not Path(camera.device).exists():
        out.append(f"planner.camera.device: {camera.device} does not exist")
    return out


def problems(cfg: DuetConfig) -> list[str]:
    return bundle_problems(cfg) + device_problems(cfg)
