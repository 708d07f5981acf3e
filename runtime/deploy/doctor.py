"""`duet doctor`: is this machine ready to run duet? One ok/warn/fail line per check, each
problem with its fix; exit 1 when anything fails.

Checks are plain functions of the config and the host (paths under `sys_root` so the
kernel-facing ones can be pointed at another tree); none of them needs the services running.
"""

from __future__ import annotations

import os
import resource
import shutil
import stat
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from runtime.buses import bus_sections
from runtime.config import CanBusConfig, ConfigError, DuetConfig, load_config

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    detail: str
    fix: str = ""


def _cmd(argv: list[str], timeout_s: float = 3.0) -> str | None:
    """stdout of a helper tool, or None when it is absent or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def check_serial(device: str) -> Check:
    if device == "sim":
        return Check("bus device", OK, "sim pty (created by the sim at start)")
    path = Path(device)
    if not path.exists():
        return Check("bus device", FAIL, f"{device} does not exist",
                     "plug in the adapter; check `udevadm info -a -n /dev/ttyUSB0` against "
                     "/etc/udev/rules.d/99-duet-serial.rules (re-run duet install --usb-serial)")
    if not stat.S_ISCHR(path.stat().st_mode):
        return Check("bus device", FAIL, f"{device} is not a character device")
    if not os.access(path, os.R_OK | os.W_OK):
        return Check("bus device", FAIL, f"{device} is not read/writable by uid {os.getuid()}",
                     "the duet user must be in the device's group: usermod -aG dialout duet")
    real = os.path.realpath(device)
    latency = Path("/sys/bus/usb-serial/devices") / Path(real).name / "latency_timer"
    if latency.exists() and latency.read_text().strip() not in ("0", "1"):
        return Check("bus device", WARN,
                     f"{device} ok but FTDI latency_timer is {latency.read_text().strip()} ms",
                     f"echo 1 | sudo tee {latency} (the duet udev rule sets it on plug-in)")
    return Check("bus device", OK, f"{device} -> {real}, read/write")


def check_can(bus: CanBusConfig, sys_root: Path = Path("/sys")) -> Check:
    if bus.interface != "socketcan":
        return Check("bus device", OK, f"python-can interface {bus.interface!r} ({bus.channel})")
    base = sys_root / "class" / "net" / bus.channel
    if not base.exists():
        return Check("bus device", FAIL, f"CAN interface {bus.channel} does not exist",
                     "plug in the adapter; check /etc/systemd/network/80-duet-can.link")
    flags = int((base / "flags").read_text(), 16)
    if not flags & 0x1:  # IFF_UP
        return Check("bus device", FAIL, f"CAN interface {bus.channel} is down",
                     f"sudo ip link set {bus.channel} up type can bitrate {bus.bitrate}")
    return Check("bus device", OK, f"CAN interface {bus.channel} is up")


def check_realtime(cfg: DuetConfig) -> list[Check]:
    rt = cfg.follower.realtime
    out = []
    if rt.sched_fifo_priority == 0:
        out.append(Check("real-time", WARN, "follower.realtime.sched_fifo_priority is 0: "
                         "the loop runs SCHED_OTHER and competes with everything else",
                         "duet config set follower.realtime.sched_fifo_priority=80"))
    else:
        soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(rt.sched_fifo_priority))
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
            out.append(Check("real-time", OK, f"SCHED_FIFO {rt.sched_fifo_priority} permitted "
                             f"(RLIMIT_RTPRIO {_limit(soft)})"))
        except OSError as exc:
            out.append(Check("real-time", WARN,
                             f"SCHED_FIFO {rt.sched_fifo_priority} refused in this shell "
                             f"({exc.strerror}; RLIMIT_RTPRIO {_limit(soft)})",
                             "the unit grants it (LimitRTPRIO); for a shell run as root, or add "
                             "'@duet - rtprio 90' to /etc/security/limits.d/duet.conf"))
    runtime_us = Path("/proc/sys/kernel/sched_rt_runtime_us")
    if runtime_us.exists() and runtime_us.read_text().strip() not in ("-1",):
        out.append(Check("rt throttling", OK,
                         f"sched_rt_runtime_us {runtime_us.read_text().strip()} "
                         "(a runaway RT task cannot lock the machine)"))
    if rt.mlockall:
        soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
        if soft != resource.RLIM_INFINITY and os.geteuid() != 0:
            out.append(Check("memlock", WARN, f"RLIMIT_MEMLOCK {_limit(soft)} in this shell",
                             "the unit sets LimitMEMLOCK=infinity; run the follower via systemd"))
        else:
            out.append(Check("memlock", OK, f"RLIMIT_MEMLOCK {_limit(soft)}"))
    return out


def _limit(value: int) -> str:
    return "unlimited" if value == resource.RLIM_INFINITY else str(value)


def check_governor(cpu: int | None, sys_root: Path = Path("/sys")) -> Check:
    cpus = sys_root / "devices" / "system" / "cpu"
    files = ([cpus / f"cpu{cpu}" / "cpufreq" / "scaling_governor"] if cpu is not None
             else sorted(cpus.glob("cpu[0-9]*/cpufreq/scaling_governor")))
    files = [f for f in files if f.exists()]
    if not files:
        return Check("cpu governor", OK, "no cpufreq scaling here (fixed clock, VM or container)")
    governors = {f.read_text().strip() for f in files}
    if governors == {"performance"}:
        return Check("cpu governor", OK, "performance")
    return Check("cpu governor", WARN, f"governor {'/'.join(sorted(governors))}: frequency "
                 "changes add loop jitter",
                 "echo performance | sudo tee /sys/devices/system/cpu/cpu*/cpufreq/"
                 "scaling_governor (Jetson: sudo jetson_clocks)")


def check_clock() -> list[Check]:
    out = []
    res = time.clock_getres(time.CLOCK_MONOTONIC)
    level = OK if res <= 1e-6 else WARN
    out.append(Check("monotonic clock", level, f"resolution {res * 1e9:.0f} ns",
                     "" if level == OK else "enable CONFIG_HIGH_RES_TIMERS in the kernel"))
    source = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
    if source.exists() and source.read_text().strip() in ("jiffies", "refined-jiffies"):
        out.append(Check("clocksource", WARN, f"{source.read_text().strip()} is coarse",
                         "boot with a hardware clocksource (tsc, arch_sys_counter)"))
    synced = _cmd(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
    if synced is None:
        out.append(Check("wall clock", WARN, "cannot tell NTP sync (no timedatectl or no "
                         "systemd-timedated); recordings carry wall-clock log times",
                         "install systemd-timesyncd or chrony"))
    elif synced == "yes":
        out.append(Check("wall clock", OK, "NTP synchronised"))
    else:
        out.append(Check("wall clock", WARN, "not NTP synchronised",
                         "sudo timedatectl set-ntp true (needs network once)"))
    return out


def check_bundle(cfg: DuetConfig) -> list[Check]:
    from runtime.bundle import BundleError, load_bundle

    try:
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, list(cfg.robot.joints))
    except BundleError as exc:
        return [Check("bundle", FAIL, str(exc),
                      "duet bundle rollback, or reinstall the bundle: duet install --bundle DIR")]
    out = [Check("bundle", OK, f"{bundle.manifest.version} at {cfg.bundle.path}: hashes ok"
                 + (", signature ok" if bundle.signed else ""))]
    if cfg.bundle.public_key is None:
        out.append(Check("bundle signature", WARN, "bundle.public_key not set: any bundle "
                         "with matching hashes loads", "set bundle.public_key to the "
                         "export signing key's public half"))
    return out


def check_engine(cfg: DuetConfig) -> list[Check]:
    out = []
    if cfg.bundle.engine == "tensorrt":
        try:
            import tensorrt

            out.append(Check("engine", OK, f"TensorRT {tensorrt.__version__}"))
        except ImportError:
            out.append(Check("engine", FAIL, "bundle.engine is tensorrt but TensorRT is not "
                             "importable", "install JetPack's python3-libnvinfer into the venv "
                             "(--system-site-packages) or set bundle.engine=onnxruntime"))
        gpu = [p for p in ("/dev/nvidia0", "/dev/nvhost-gpu", "/dev/nvgpu/igpu0/ctrl")
               if Path(p).exists()]
        out.append(Check("gpu", OK, f"GPU device {gpu[0]}") if gpu else
                   Check("gpu", FAIL, "no GPU device node",
                         "check the NVIDIA driver (nvidia-smi / tegrastats)"))
    else:
        import onnxruntime

        out.append(Check("engine", OK, f"onnxruntime {onnxruntime.__version__} "
                         f"({', '.join(onnxruntime.get_available_providers())})"))
    mode = _cmd(["nvpmodel", "-q"])
    if mode is not None:
        first = mode.splitlines()[0] if mode else "?"
        level = OK if "MAXN" in mode.upper() else WARN
        out.append(Check("jetson power", level, first,
                         "" if level == OK else "sudo nvpmodel -m 0 && sudo jetson_clocks"))
    return out


def check_disk(cfg: DuetConfig) -> Check:
    folder = Path(cfg.recorder.dir)
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free_mb = shutil.disk_usage(probe).free / 2**20
    budget = cfg.recorder.budget_mb
    if free_mb < 0.1 * budget:
        return Check("disk", FAIL, f"{free_mb:.0f} MB free at {probe}, recorder budget "
                     f"{budget:.0f} MB", "free space or lower recorder.budget_mb")
    if free_mb < budget:
        return Check("disk", WARN, f"{free_mb:.0f} MB free at {probe} < recorder budget "
                     f"{budget:.0f} MB", "free space or lower recorder.budget_mb")
    return Check("disk", OK, f"{free_mb:.0f} MB free at {probe} (budget {budget:.0f} MB)")


def check_run_dir(cfg: DuetConfig) -> Check:
    run_dir = Path(cfg.run_dir)
    if not run_dir.exists():
        return Check("run dir", OK, f"{run_dir} absent (systemd creates it: RuntimeDirectory)")
    if not os.access(run_dir, os.W_OK):
        return Check("run dir", WARN, f"{run_dir} not writable by uid {os.getuid()}",
                     "run the duet CLI as the duet user or in its group")
    return Check("run dir", OK, f"{run_dir} writable")


def diagnose(config: Path, site: Path | None) -> list[Check]:
    try:
        cfg = load_config(config, site)
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc), "fix the file, then: duet config validate")]
    checks = [Check("config", OK, f"{config}" + (f" + {site}" if site and site.exists() else ""))]
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: [check_can(bus) if isinstance(bus, CanBusConfig) else check_serial(bus.device)
                 for bus, _ in bus_sections(cfg)],
        lambda: check_realtime(cfg),
        lambda: check_governor(cfg.follower.realtime.cpu),
        check_clock,
        lambda: check_bundle(cfg),
        lambda: check_engine(cfg),
        lambda: check_disk(cfg),
        lambda: check_run_dir(cfg),
    ]
    for step in steps:
        result = step()
        checks.extend(result if isinstance(result, list) else [result])
    return checks


def report(checks: list[Check]) -> tuple[str, int]:
    style = {OK: "ok  ", WARN: "WARN", FAIL: "FAIL"}
    width = max(len(c.name) for c in checks)
    lines = []
    for c in checks:
        lines.append(f"{style[c.level]}  {c.name:<{width}}  {c.detail}")
        if c.fix and c.level != OK:
            lines.append(f"      {'':<{width}}  fix: {c.fix}")
    fails = sum(c.level == FAIL for c in checks)
    warns = sum(c.level == WARN for c in checks)
    lines.append(f"{len(checks)} checks: {fails} failed, {warns} warnings")
    return "\n".join(lines), 1 if fails else 0
