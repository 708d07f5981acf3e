"""What install writes for systemd and udev, rendered from the config: the units with their
prefix, the follower's real-time and device drop-ins, the CPU drop-ins that keep the planner
and recorder off the follower's core, the udev rules of the motor family, offline enabling
(the symlinks `systemctl enable` would make) and the restart line printed after a change."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from drivers.families import family_of
from runtime.config import DuetConfig
from runtime.deploy.journal import Journal
from runtime.deploy.layout import UNIT_PREFIX, templates_dir
from runtime.follower.buses import single_bus

UNITS = ("duet.target", "duet-follower.service", "duet-planner.service", "duet-recorder.service",
         "duet-watch.service")
# the long-running services (the watch is a run-once unit: no start limit, no drop-ins)
SERVICES = UNITS[1:4]
DROPIN = "duet-follower.service.d/realtime.conf"
DEVICE_DROPIN = "duet-follower.service.d/device.conf"
CPU_DROPIN = "cpu.conf"  # in duet-planner.service.d and duet-recorder.service.d


# ---------------------------------------------------------------------- rendering
def render_realtime_dropin(cfg: DuetConfig) -> str:
    rt = cfg.follower.realtime
    lines = ["# Rendered by duet from follower.realtime; edit the config, not this.",
             "[Service]"]
    if rt.sched_fifo_priority > 0:
        lines += ["CPUSchedulingPolicy=fifo",
                  f"CPUSchedulingPriority={rt.sched_fifo_priority}",
                  f"LimitRTPRIO={rt.sched_fifo_priority}"]
    else:
        lines += ["CPUSchedulingPolicy=other", "CPUSchedulingPriority=", "LimitRTPRIO=0"]
    # an empty assignment resets what the unit set
    lines.append(f"CPUAffinity={rt.cpu}" if rt.cpu is not None else "CPUAffinity=")
    return "\n".join(lines) + "\n"


def render_cpu_dropin(cfg: DuetConfig, n_cpus: int) -> str:
    """CPUAffinity for the planner and the recorder: every core but the follower's."""
    cpu = cfg.follower.realtime.cpu
    others = [c for c in range(n_cpus) if c != cpu]
    keep = cpu is not None and 0 <= cpu < n_cpus and others
    return ("# Rendered by duet from follower.realtime.cpu; edit the config, not this.\n"
            "[Service]\n" + (f"CPUAffinity={' '.join(map(str, others))}\n" if keep
                              else "CPUAffinity=\n"))


def device_unit(cfg: DuetConfig) -> str:
    """The systemd .device unit of the motor bus (as `systemd-escape --path` names it)."""
    bus = single_bus(cfg, "duet install")
    path = family_of(bus).device_path(bus)
    out = []
    for i, ch in enumerate(path.strip("/")):
        if ch == "/":
            out.append("-")
        elif ch.isalnum() or ch in "_:" or (ch == "." and i > 0):
            out.append(ch)
        else:
            out.append(f"\\x{ord(ch):02x}")
    return "".join(out) + ".device"


def render_device_dropin(cfg: DuetConfig) -> str:
    """Start the follower once the bus adapter exists (udev may name it after boot), instead
    of burning the restart budget on a missing device."""
    unit = device_unit(cfg)
    return ("# Rendered by duet from bus.*; edit the config, not this.\n"
            f"[Unit]\nWants={unit}\nAfter={unit}\n")


def render_dropins(cfg: DuetConfig, n_cpus: int | None = None) -> dict[str, str]:
    """Unit drop-ins derived from the config: path under the units folder -> content."""
    cpus = n_cpus or os.cpu_count() or 1
    out = {DROPIN: render_realtime_dropin(cfg), DEVICE_DROPIN: render_device_dropin(cfg)}
    for unit in ("duet-planner.service", "duet-recorder.service"):
        out[f"{unit}.d/{CPU_DROPIN}"] = render_cpu_dropin(cfg, cpus)
    return out


def render_unit(text: str, prefix: str) -> str:
    return text.replace(UNIT_PREFIX + "/", prefix.rstrip("/") + "/")


def render_udev(cfg: DuetConfig, usb_serial: str | None) -> dict[str, str]:
    """File name (relative to root) -> content, for the configured bus's family."""
    tpl = templates_dir()
    bus = single_bus(cfg, "duet install")
    return {rel: (tpl / template).read_text().format(**values)
            for rel, (template, values) in family_of(bus).udev_files(bus, usb_serial).items()}


def wanted_by(unit_text: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit_text)
    if not parser.has_section("Install"):
        return []
    return parser.get("Install", "WantedBy", fallback="").split()


def service_settings(units_dir: Path, unit: str) -> dict[str, list[str]]:
    """The [Service] settings of an installed unit and its drop-ins (later files win; list
    settings such as SupplementaryGroups= accumulate, an empty one resets, as in systemd)."""
    files = [units_dir / unit, *sorted((units_dir / f"{unit}.d").glob("*.conf"))]
    out: dict[str, list[str]] = {}
    for path in files:
        if not path.is_file():
            continue
        section = ""
        for raw in path.read_text().splitlines():
            line = raw.strip()
            if line.startswith("["):
                section = line
            elif section == "[Service]" and "=" in line and not line.startswith("#"):
                key, _, value = line.partition("=")
                out[key] = [*out.get(key, []), *value.split()] if value else []
    return out


def enable_offline(units_dir: Path, unit: str, journal: Journal | None = None) -> list[Path]:
    """What `systemctl --root enable` does: a .wants symlink per WantedBy target."""
    journal = journal or Journal()
    made = []
    for target in wanted_by((units_dir / unit).read_text()):
        link = units_dir / f"{target}.wants" / unit
        journal.symlink(link, f"/etc/systemd/system/{unit}")
        made.append(link)
    return made


def enabled_services(root: Path = Path("/")) -> list[str]:
    """The duet services that exist and are enabled under `root` (install enables the
    recorder only with recorder.enabled): asked of `systemctl is-enabled`, else read from the
    .wants links install makes. Empty: duet is not installed there (a workstation)."""
    units_dir = Path(root) / "etc/systemd/system"
    if not (units_dir / "duet-follower.service").is_file():
        return []
    if shutil.which("systemctl") is None:
        return [u for u in SERVICES if (units_dir / "duet.target.wants" / u).exists()]
    on = [] if Path(root) == Path("/") else [f"--root={root}"]
    out = []
    for unit in SERVICES:  # one call each: a missing unit prints only to stderr
        answer = subprocess.run(["systemctl", *on, "is-enabled", unit], capture_output=True,
                                text=True, check=False)
        if answer.stdout.strip() in ("enabled", "enabled-runtime"):
            out.append(unit)
    return out


# Where duet is not installed, `duet run` is the supervisor: a change loads at its next start.
WORKSTATION_RESTART = "stop `duet run` (Ctrl-C, or duet stop) and start it again"


def restart_command(units: Sequence[str] = ("duet.target",), root: Path = Path("/")) -> str:
    """The command that really restarts duet, also after a service hit its start limit
    (`systemctl restart` alone leaves a unit in start-limit-hit failed). It names only units
    that exist and are enabled: `reset-failed` of a unit systemd has not loaded (the recorder,
    disabled by default) exits 1 and the `&&` skips the restart."""
    services = enabled_services(root)
    if not services:
        return WORKSTATION_RESTART
    wanted = [u for u in units if u.endswith(".target") or u in services] or ["duet.target"]
    return (f"sudo systemctl reset-failed {' '.join(services)} && "
            f"sudo systemctl restart {' '.join(wanted)}")
