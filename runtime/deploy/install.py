"""`duet install`: put duet on a robot (or into a staging tree with --root).

Writes the units (+ the real-time drop-in rendered from follower.realtime), the duet user
(sysusers.d) and its directories (tmpfiles.d), udev rules naming the motor bus, the config
under /etc/duet and the bundle under /var/lib/duet/bundles, then enables the units. On the
live system (root = /) it also runs sysusers, tmpfiles, udev reload and systemctl.
"""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from runtime.buses import single_bus
from runtime.config import CanBusConfig, DuetConfig, load_config
from runtime.deploy.bundle_store import BundleStore
from runtime.deploy.config_edit import atomic_write
from runtime.deploy.layout import UNIT_PREFIX, Layout, repo_systemd_dir, templates_dir

UNITS = ("duet.target", "duet-follower.service", "duet-planner.service", "duet-recorder.service")
DROPIN = "duet-follower.service.d/realtime.conf"
DEVICE_DROPIN = "duet-follower.service.d/device.conf"
CPU_DROPIN = "cpu.conf"  # in duet-planner.service.d and duet-recorder.service.d
# USB ids of the ROBOTIS U2D2 (FTDI FT232H), the usual Dynamixel adapter.
U2D2_MATCH = 'ATTRS{idVendor}=="0403", ATTRS{idProduct}=="6014"'

Runner = Callable[[Sequence[str]], None]


class InstallError(Exception):
    pass


def run_checked(cmd: Sequence[str]) -> None:
    print("+ " + " ".join(cmd))
    subprocess.run(list(cmd), check=True)


def make_venv(venv: Path, source: Path, run: Runner = run_checked) -> None:
    """A virtualenv with this checkout installed (robot extras only: never torch)."""
    run([sys.executable, "-m", "venv", str(venv)])
    run([str(venv / "bin" / "pip"), "install", "--upgrade", "pip"])
    run([str(venv / "bin" / "pip"), "install", str(source)])


def render_realtime_dropin(cfg: DuetConfig) -> str:
    rt = cfg.follower.realtime
    lines = ["# Rendered by `duet install` from follower.realtime; edit the config, not this.",
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
    return ("# Rendered by `duet install` from follower.realtime.cpu; edit the config, not this.\n"
            "[Service]\n" + (f"CPUAffinity={' '.join(map(str, others))}\n" if keep
                              else "CPUAffinity=\n"))


def device_unit(cfg: DuetConfig) -> str:
    """The systemd .device unit of the motor bus (as `systemd-escape --path` names it)."""
    bus = single_bus(cfg, "duet install")
    if isinstance(bus, CanBusConfig):
        path = f"/sys/subsystem/net/devices/{bus.channel}"
    else:
        path = bus.device
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
    return ("# Rendered by `duet install` from bus.*; edit the config, not this.\n"
            f"[Unit]\nWants={unit}\nAfter={unit}\n")


def render_unit(text: str, prefix: str) -> str:
    return text.replace(UNIT_PREFIX + "/", prefix.rstrip("/") + "/")


def render_udev(cfg: DuetConfig, usb_serial: str | None) -> dict[str, str]:
    """File name (relative to root) -> content, for the configured bus kind."""
    tpl = templates_dir()
    bus = single_bus(cfg, "duet install")
    if isinstance(bus, CanBusConfig):
        match = (f"Property=ID_SERIAL_SHORT={usb_serial}" if usb_serial
                 else "Driver=gs_usb")  # candleLight / CANable firmware
        ip = shutil.which("ip") or "/usr/sbin/ip"
        return {
            "etc/systemd/network/80-duet-can.link": (tpl / "80-duet-can.link").read_text()
            .format(match=match, channel=bus.channel),
            "etc/udev/rules.d/99-duet-can.rules": (tpl / "99-duet-can.rules").read_text()
            .format(channel=bus.channel, bitrate=bus.bitrate, ip=ip),
        }
    match = f'ATTRS{{serial}}=="{usb_serial}"' if usb_serial else U2D2_MATCH
    return {"etc/udev/rules.d/99-duet-serial.rules":
            (tpl / "99-duet-serial.rules").read_text().format(match=match)}


def wanted_by(unit_text: str) -> list[str]:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(unit_text)
    if not parser.has_section("Install"):
        return []
    return parser.get("Install", "WantedBy", fallback="").split()


def enable_offline(units_dir: Path, unit: str) -> list[Path]:
    """What `systemctl --root enable` does: a .wants symlink per WantedBy target."""
    made = []
    for target in wanted_by((units_dir / unit).read_text()):
        link = units_dir / f"{target}.wants" / unit
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(f"/etc/systemd/system/{unit}")
        made.append(link)
    return made


def _write(path: Path, text: str) -> None:
    atomic_write(path, text, backup=path.exists() and path.read_text() != text)


@dataclass
class InstallPlan:
    layout: Layout
    prefix: str
    config: Path
    bundle: Path | None = None
    usb_serial: str | None = None
    venv: bool = True
    source: Path = field(default_factory=lambda: repo_systemd_dir().parent)
    run: Runner = run_checked
    log: Callable[[str], None] = print

    @property
    def live(self) -> bool:
        return self.layout.root == Path("/")


def install(plan: InstallPlan) -> list[str]:
    """Install; returns the units enabled."""
    lay = plan.layout
    cfg = load_config(plan.config)  # refuse an invalid config before touching anything
    units_src = repo_systemd_dir()
    if not (units_src / "duet-follower.service").is_file():
        raise InstallError(f"unit files not found in {units_src} (run from a duet checkout)")
    if plan.bundle is not None:
        BundleStore(lay.bundles, cfg.bundle.public_key, cfg.robot.joints).verify(plan.bundle)

    prefix_dir = lay.root / plan.prefix.lstrip("/")
    prefix_dir.mkdir(parents=True, exist_ok=True)
    if plan.venv:
        make_venv(prefix_dir / "venv", plan.source, plan.run)
    # the units' Documentation= points here: the README's "On the robot" section
    shutil.copyfile(units_src.parent / "README.md", prefix_dir / "README.md")

    for unit in UNITS:
        _write(lay.units / unit, render_unit((units_src / unit).read_text(), plan.prefix))
    _write(lay.units / DROPIN, render_realtime_dropin(cfg))
    _write(lay.units / DEVICE_DROPIN, render_device_dropin(cfg))
    for unit in ("duet-planner.service", "duet-recorder.service"):
        _write(lay.units / f"{unit}.d" / CPU_DROPIN, render_cpu_dropin(cfg, os.cpu_count() or 1))
    _write(lay.sysusers / "duet.conf", (units_src / "duet.sysusers.conf").read_text())
    _write(lay.tmpfiles / "duet.conf", (units_src / "duet.tmpfiles.conf").read_text())
    for rel, text in render_udev(cfg, plan.usb_serial).items():
        _write(lay.root / rel, text)
    plan.log(f"units, drop-in, sysusers, tmpfiles and udev rules written under {lay.root}")

    _write(lay.config, plan.config.read_text())
    for folder in (lay.bundles, lay.recordings, lay.state / "engines"):
        folder.mkdir(parents=True, exist_ok=True)
    if plan.bundle is not None:
        store = BundleStore(lay.bundles, cfg.bundle.public_key, cfg.robot.joints)
        version = store.add(plan.bundle)
        store.activate(version)
        plan.log(f"bundle {version} installed and current")
    if not lay.site.exists():
        site = ["# Site overrides layered on duet.yaml; `duet config set` edits this file.",
                "run_dir: /run/duet"]
        if plan.bundle is not None:
            site.append("bundle:\n  path: /var/lib/duet/bundles/current")
        _write(lay.site, "\n".join(site) + "\n")
    load_config(lay.config, lay.site)  # what the services will load must validate

    enabled = ["duet.target", "duet-follower.service", "duet-planner.service"]
    if cfg.recorder.enabled:
        enabled.append("duet-recorder.service")
    if plan.live:
        plan.run(["systemd-sysusers", str(lay.sysusers / "duet.conf")])
        plan.run(["systemd-tmpfiles", "--create", str(lay.tmpfiles / "duet.conf")])
        plan.run(["udevadm", "control", "--reload"])
        plan.run(["udevadm", "trigger", "--subsystem-match=tty", "--subsystem-match=net"])
        plan.run(["systemctl", "daemon-reload"])
        plan.run(["systemctl", "enable", *enabled])
    else:
        for unit in enabled:
            enable_offline(lay.units, unit)
    plan.log("enabled: " + " ".join(enabled))
    return enabled


def ensure_root_user(plan: InstallPlan) -> None:
    if plan.live and os.geteuid() != 0:
        raise InstallError("installing onto this system needs root (sudo duet install ...)")
