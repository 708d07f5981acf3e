"""`duet doctor`: is this machine ready to run duet? One ok/warn/fail line per check, each
problem with its fix; exit 1 when anything fails.

Checks are plain functions of the config and the host (paths under `sys_root` so the
kernel-facing ones can be pointed at another tree); none of them needs the services running.
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from drivers.families import family_of
from runtime.config import BusConfig, ConfigError, DuetConfig, load_config
from runtime.follower.buses import bus_sections

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


def check_bus(bus: BusConfig, installed: bool = False, sys_root: Path = Path("/sys")) -> Check:
    """The bus's device, as its family checks it (a serial device's node and permissions, a
    CAN interface being up, ...)."""
    level, detail, fix = family_of(bus).check_device(bus, installed, str(sys_root))
    return Check("bus device", level, detail, fix)


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
    from runtime.model.bundle import BundleError, load_bundle

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


def check_engine(cfg: DuetConfig, jetson: bool = False) -> list[Check]:
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
        return out
    return check_providers(cfg, jetson)


def check_providers(cfg: DuetConfig, jetson: bool) -> list[Check]:
    """The execution providers ONNX Runtime offers here, against those the config asks for."""
    import onnxruntime

    from runtime.model.engines.onnxruntime_engine import PROVIDERS, ort_cache_dir

    offered = onnxruntime.get_available_providers()
    dists = metadata.packages_distributions().get("onnxruntime", [])
    where = f"{Path(onnxruntime.__file__).parent}" + (f", {'/'.join(dists)}" if dists else "")
    out = [Check("engine", OK, f"onnxruntime {onnxruntime.__version__} ({where}) offers "
                 f"{', '.join(offered)}")]
    gpu = {PROVIDERS["tensorrt"], PROVIDERS["cuda"]}
    if jetson and not gpu & set(offered):
        out.append(Check("onnxruntime", WARN, "a CPU-only onnxruntime on a Jetson: the planner "
                         "cannot use the GPU", "install NVIDIA's onnxruntime-gpu for this JetPack "
                         "(Jetson AI Lab / Jetson Zoo wheel), then reinstall duet (duet install "
                         "keeps PyPI's onnxruntime out of the venv on L4T)"))
    opts = cfg.bundle.onnxruntime
    for role in ("planner", "follower"):
        names = getattr(opts, f"{role}_providers")
        key = f"bundle.onnxruntime.{role}_providers"
        missing = [n for n in names if PROVIDERS[n] not in offered]
        if missing:
            out.append(Check("providers", FAIL, f"{key} asks for {', '.join(missing)}, which "
                             "this onnxruntime does not offer: that process will not start",
                             "install NVIDIA's onnxruntime-gpu (and no PyPI onnxruntime over it),"
                             f" or: duet config set {key}=[cpu]"))
        else:
            cache = f"; TensorRT engines in {ort_cache_dir(cfg.bundle.engine_cache)}" \
                if "tensorrt" in names else ""
            out.append(Check("providers", OK, f"{role}: {', '.join(names)}{cache}"))
    return out


def check_jetson(root: Path = Path("/")) -> list[Check]:
    """On a Jetson (L4T): the release, the power mode and the clocks. Nothing elsewhere."""
    from runtime.deploy import jetson

    release = jetson.l4t_release(root)
    if release is None:
        return []
    out = [Check("jetson", OK if release.jetpack == "6" else WARN, str(release),
                 "" if release.jetpack == "6" else "duet's Jetson path is made for JetPack 6 "
                 "(L4T R36, Python 3.10)")]
    text = _cmd(["nvpmodel", "-q"])
    mode = jetson.parse_nvpmodel(text) if text is not None else None
    if mode is None:
        out.append(Check("power mode", WARN, "`nvpmodel -q` gave no power mode"
                         + ("" if shutil.which("nvpmodel") else " (nvpmodel not found)"),
                         "install nvidia-l4t-tools; then: sudo nvpmodel -q"))
    else:
        ident = f" (mode {mode.mode_id})" if mode.mode_id is not None else ""
        out.append(Check("power mode", OK if mode.is_max else WARN, f"{mode.name}{ident}",
                         "" if mode.is_max else "a capped mode slows the planner and adds "
                         "jitter: sudo nvpmodel -m 0 (MAXN on Orin AGX/NX; nvpmodel -p --verbose "
                         "lists the modes)"))
    text = _cmd(["jetson_clocks", "--show"])
    clocks = jetson.parse_jetson_clocks(text) if text is not None else None
    if clocks is None:
        out.append(Check("jetson_clocks", WARN, "cannot read the clock state ("
                         + ("`jetson_clocks --show` failed: it needs root"
                            if shutil.which("jetson_clocks") else "jetson_clocks not found") + ")",
                         "sudo duet doctor"))
    else:
        out.append(Check("jetson_clocks", OK if clocks.pinned else WARN, str(clocks),
                         "" if clocks.pinned else "frequency changes add loop jitter: sudo "
                         "jetson_clocks (at every boot: a oneshot unit running it)"))
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


def check_cameras(cfg: DuetConfig) -> list[Check]:
    """Every configured camera: a V4L2 device must exist and be readable."""
    from runtime.deploy.preflight import camera_problems

    found = camera_problems(cfg)
    if found:
        return [Check("camera", FAIL, p, "plug the camera in; `v4l2-ctl --list-devices` "
                      "names it; the duet user is in group video") for p in found]
    kinds = ", ".join(f"{n} ({c.kind}{' ' + c.device if c.kind == 'v4l2' else ''})"
                      for n, c in cfg.planner.cameras.items())
    return [Check("camera", OK, kinds or "no camera configured")]


def check_remote(cfg: DuetConfig) -> list[Check]:
    """The off-board planner: key files, and plaintext TCP flagged (preflight.remote_checks)."""
    from runtime.deploy.preflight import remote_checks

    return [Check("off-board planner", level, detail, fix)
            for level, detail, fix in remote_checks(cfg)]


def _systemctl_show(unit: str) -> dict[str, str]:
    out = _cmd(["systemctl", "show", unit, "-p", "LoadState", "-p", "ActiveState",
                "-p", "SubState", "-p", "Result", "-p", "NRestarts", "-p", "UnitFileState"])
    if out is None:
        return {}
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def check_services(cfg: DuetConfig, units_dir: Path = Path("/etc/systemd/system")
                   ) -> list[Check]:
    """The services of an installed duet, as systemd sees them."""
    from runtime.deploy.install import restart_command

    if not (units_dir / "duet-follower.service").is_file():
        return [Check("services", OK, "duet is not installed here (no units): checks of a "
                      "workstation run only")]
    if shutil.which("systemctl") is None:
        return [Check("services", WARN, "systemctl not found", "run duet doctor on the robot")]
    units = ["duet-follower.service", "duet-planner.service"]
    if cfg.recorder.enabled:
        units.append("duet-recorder.service")
    out = []
    for unit in units:
        info = _systemctl_show(unit)
        state, sub, result = (info.get("ActiveState", "?"), info.get("SubState", "?"),
                              info.get("Result", "?"))
        detail = f"{unit}: {state}/{sub}, restarts {info.get('NRestarts', '?')}"
        if state == "active":
            out.append(Check("service", OK, detail))
        elif state == "failed":
            why = " (start limit hit: systemd stopped restarting it)" \
                if result == "start-limit-hit" else f" (result {result})"
            out.append(Check("service", FAIL, detail + why,
                             f"journalctl -u {unit} -n 50 shows why; once fixed: "
                             f"{restart_command()}"))
        elif state in ("activating", "deactivating", "reloading"):
            out.append(Check("service", WARN, detail, f"journalctl -u {unit} -f"))
        else:
            out.append(Check("service", WARN, detail + " (not started)",
                             "sudo systemctl start duet.target"))
    return out


def check_run_dir(run_dir: str) -> list[Check]:
    """The live run dir: who holds it, a latched fault, a telemetry sample."""
    from runtime.ipc import endpoints, rundir
    from runtime.observe.status import collect, diagnosis

    path = Path(run_dir)
    if not path.exists():
        return [Check("run dir", WARN, f"{path} absent: nothing running here",
                      "sudo systemctl start duet.target (or --run-dir / DUET_RUN_DIR)")]
    out = []
    if not os.access(path, os.R_OK | os.X_OK):
        out.append(Check("run dir", FAIL, f"{path} not readable by uid {os.getuid()}",
                         "add yourself to the operators' group: sudo usermod -aG duet $USER "
                         "(log in again)"))
        return out
    latch = path / endpoints.LATCH
    if latch.exists():
        try:
            text = latch.read_text().strip()
        except OSError as exc:
            text = f"(unreadable: {exc.strerror})"
        out.append(Check("latched fault", FAIL, f"{latch}: {text}",
                         "check the robot, then: duet reset (the latch survives restarts)"))
    held, pid = rundir.holder(path, endpoints.FOLLOWER_LOCK)
    if not held:
        out.append(Check("run dir", WARN, f"{path}: no follower holds it",
                         "sudo systemctl start duet.target"))
        return out
    sample = collect(run_dir, 1.5)
    found = diagnosis(sample)
    follower = sample.get("follower") or {}
    detail = (f"{path}: follower pid {pid or '?'} in {follower.get('mode', '?')}, "
              f"planner {(sample.get('planner') or {}).get('status', 'silent')}")
    out.append(Check("run dir", OK, detail) if not found else
               Check("run dir", FAIL, f"{detail}; " + "; ".join(w for w, _ in found),
                     "; ".join(dict.fromkeys(step for _, step in found))))
    return out


def _cpu_ticks() -> dict[int, tuple[int, str]]:
    """pid -> (utime + stime in clock ticks, command) for every process."""
    out = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat_file.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1:text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        out[int(stat_file.parent.name)] = (int(fields[11]) + int(fields[12]), name)
    return out


def check_cpu(cfg: DuetConfig, sample_s: float = 0.5) -> Check:
    """Other programs competing for CPU: load and the busiest non-duet processes."""
    before = _cpu_ticks()
    time.sleep(sample_s)
    after = _cpu_ticks()
    hz = os.sysconf("SC_CLK_TCK")
    mine = {os.getpid(), os.getppid()}
    busy = []
    for pid, (ticks, name) in after.items():
        if pid in mine or pid not in before:
            continue
        share = (ticks - before[pid][0]) / hz / sample_s
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace").strip()
        except OSError:
            cmdline = name
        if share >= 0.2 and "duet" not in cmdline and "runtime.cli" not in cmdline:
            busy.append((share, pid, cmdline[:60] or name))
    busy.sort(reverse=True)
    load1 = os.getloadavg()[0]
    ncpu = os.cpu_count() or 1
    core = cfg.follower.realtime.cpu
    where = f"cpu {core} (the follower's)" if core is not None else "the follower"
    if busy:
        top = ", ".join(f"pid {pid} {cmd!r} {share:.0%}" for share, pid, cmd in busy[:3])
        return Check("cpu contention", WARN, f"load {load1:.2f} on {ncpu} cores; busy: {top}",
                     f"keep them off {where}: taskset / CPUAffinity=, or renice them"
                     + ("" if core is not None else "; pin the follower: duet config set "
                        "follower.realtime.cpu=N"))
    level = WARN if load1 > ncpu else OK
    return Check("cpu contention", level, f"load {load1:.2f} on {ncpu} cores; no other "
                 "process above 20% of a core", "" if level == OK else "find it: top -o %CPU")


def diagnose(config: Path, site: Path | None, run_dir: str) -> list[Check]:
    from runtime.deploy.layout import installed_root

    try:
        cfg = load_config(config, site)
    except ConfigError as exc:
        return [Check("config", FAIL, str(exc), "fix the file, then: duet config validate")]
    root = installed_root(config)
    installed = root is not None
    system = root if root is not None else Path("/")  # a staged install: its /etc
    jetson = check_jetson(system)
    checks = [Check("config", OK, f"{config}" + (f" + {site}" if site and site.exists() else ""))]
    steps: list[Callable[[], Check | list[Check]]] = [
        lambda: [check_bus(bus, installed) for bus, _ in bus_sections(cfg)],
        lambda: check_cameras(cfg),
        lambda: check_services(cfg),
        lambda: check_run_dir(run_dir),
        lambda: check_cpu(cfg),
        lambda: check_realtime(cfg),
        lambda: check_governor(cfg.follower.realtime.cpu),
        check_clock,
        lambda: check_bundle(cfg),
        lambda: jetson,
        lambda: check_engine(cfg, bool(jetson)),
        lambda: check_disk(cfg),
        lambda: check_remote(cfg),
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
