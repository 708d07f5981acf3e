"""Every start-time check, in one place: what `duet config validate` runs (`nginx -t` for duet)
and what the follower and planner refuse to start on. Each check returns the problems it
found, naming the key, the file or the input and the reason; an empty list means go."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivers.families import family_of
from runtime.config import DuetConfig
from runtime.follower.buses import bus_sections
from runtime.model.bundle import BundleError, load_bundle
from runtime.model.robot_bundle import contract_problems
from runtime.model.timing import Latency, Level, declared_checks, timing_checks


def bundle_problems(cfg: DuetConfig) -> list[str]:
    """The bundle verifies (hashes, signature) and its contract fits this robot."""
    try:
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
    except BundleError as exc:
        return [f"bundle.path: {exc}"]
    return contract_problems(bundle.contract, cfg)


def timing_findings(cfg: DuetConfig, bench_plans: int = 0
                    ) -> tuple[list[tuple[Level, str]], Latency | None]:
    """The planner's latency against the robot's timing (runtime/model/timing.py): the
    bundle's declared latency, and with `bench_plans` the latency benched here (returned
    too). A planner off-board is timed by its server, not here."""
    if cfg.planner.remote is not None:
        return [], None
    try:
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
    except BundleError:
        return [], None  # bundle_problems says why
    out = [(level, f"planner.latency: {why}") for level, why in
           declared_checks(bundle.contract, cfg)]
    if not bench_plans:
        return out, None
    from runtime.model.engines import EngineError
    from runtime.planner.latency import bench_latency
    from runtime.planner.pipeline import PipelineError

    try:
        lat = bench_latency(bundle, cfg, bench_plans)
    except (EngineError, PipelineError, ValueError) as exc:
        return [*out, ("fail", f"bench: the planner cannot run here: {exc}")], None
    a = bundle.contract.planner.actions
    return out + [(level, f"bench: {why}") for level, why in
                  timing_checks(lat, a.horizon, a.dt_s, cfg)], lat


def _bus_keys(cfg: DuetConfig) -> list[tuple[str, Any]]:
    return [("bus" if cfg.bus is not None else f"buses.{i}", section)
            for i, (section, _) in enumerate(bus_sections(cfg))]


def device_problems(cfg: DuetConfig) -> list[str]:
    """Devices the config names exist (a sim robot's devices appear when the sim starts)."""
    out = []
    for key, section in _bus_keys(cfg):
        fam = family_of(section)
        device = fam.device_node(section)
        if device is not None and not Path(device).exists():
            out.append(f"{key}.{fam.wire_key}: {device} does not exist (adapter unplugged? "
                       "udev rule?)")
    return out + camera_problems(cfg)


def camera_problems(cfg: DuetConfig) -> list[str]:
    """Every V4L2 camera's device exists."""
    out = []
    for name, cam in cfg.planner.cameras.items():
        if cam.kind == "v4l2" and not Path(cam.device).exists():  # who may open it: doctor's
            out.append(f"planner.cameras.{name}.device: {cam.device} does not exist "
                       "(camera unplugged?)")
    return out


def sim_problems(cfg: DuetConfig) -> list[str]:
    """Why this config drives the simulated robot (empty: a real robot's config). `duet run`
    wants exactly that; `duet install` refuses it."""
    out = []
    if cfg.sim is not None and cfg.sim.enabled:
        out.append("sim.enabled is true")
    for key, section in _bus_keys(cfg):
        out += [f"{key}.{why}" for why in family_of(section).simulated(section)]
    return out


def remote_checks(cfg: DuetConfig) -> list[tuple[str, str, str]]:
    """The off-board planner's keys and plaintext, as (level, detail, fix) with `duet
    doctor`'s levels: "fail" for what refuses to start, "warn" for plaintext TCP (no
    authentication, no encryption: anyone on the path can read frames and send plans)."""
    from runtime.ipc import keys

    out: list[tuple[str, str, str]] = []
    sides = []
    if cfg.planner.remote is not None:
        r = cfg.planner.remote
        sides.append(("planner.remote", r.insecure, [("server_key", r.server_key, False),
                                                     ("robot_key", r.robot_key, True)]))
    if cfg.planner.serve is not None:
        v = cfg.planner.serve
        sides.append(("planner.serve", v.insecure, [("key", v.key, True)]))
        if not v.insecure and v.allow is not None:
            try:
                n = len(keys.load_allow_list(v.allow))
                out.append(("ok" if n else "warn", f"planner.serve.allow: {n} robot key(s)",
                            "" if n else f"copy each robot's NAME.key into {v.allow}"))
            except keys.KeyFileError as exc:
                out.append(("fail", f"planner.serve.allow: {exc}", "duet keys generate"))
    for section, insecure, files in sides:
        if insecure:
            out.append(("warn", f"{section}.insecure: true: plaintext TCP, no authentication",
                        f"duet keys generate; set the keys in {section}; insecure: false"))
            continue
        for key, path, secret in files:
            try:
                if secret:
                    keys.load_pair(str(path))
                else:
                    keys.load_public(str(path))
            except keys.KeyFileError as exc:
                out.append(("fail", f"{section}.{key}: {exc}", "duet keys generate"))
            else:
                out.append(("ok", f"{section}.{key}: {path}", ""))
    return out


def remote_problems(cfg: DuetConfig) -> list[str]:
    return [detail for level, detail, _ in remote_checks(cfg) if level == "fail"]


def problems(cfg: DuetConfig) -> list[str]:
    return bundle_problems(cfg) + device_problems(cfg) + remote_problems(cfg)
