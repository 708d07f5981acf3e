"""The host half of `duet doctor`: is this machine fit for a real-time loop? Real-time
privileges, the CPU governor, the clock, CPU contention on the follower's core, the disk, a
Jetson's power mode. Each check is a plain function of the config and the host (paths under
`sys_root`, so the kernel-facing ones can be pointed at another tree) returning `Check`s."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.config import DuetConfig

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    detail: str
    fix: str = ""


def tool_output(argv: list[str], timeout_s: float = 3.0) -> str | None:
    """stdout of a helper tool, or None when it is absent or fails."""
    if shutil.which(argv[0]) is None:
        return None
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


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
                             f"(uid {os.getuid()}: {exc.strerror}; RLIMIT_RTPRIO "
                             f"{_limit(soft)}); the follower's own grant is its unit's",
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
            out.append(Check("memlock", WARN, f"RLIMIT_MEMLOCK {_limit(soft)} in this shell "
                             f"(uid {os.getuid()})",
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
    synced = tool_output(["timedatectl", "show", "-p", "NTPSynchronized", "--value"])
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


def check_jetson(root: Path = Path("/")) -> list[Check]:
    """On a Jetson (L4T): the release, the power mode and the clocks. Nothing elsewhere."""
    from runtime.deploy import jetson

    release = jetson.l4t_release(root)
    if release is None:
        return []
    out = [Check("jetson", OK if release.jetpack == "6" else WARN, str(release),
                 "" if release.jetpack == "6" else "duet's Jetson path is made for JetPack 6 "
                 "(L4T R36, Python 3.10)")]
    text = tool_output(["nvpmodel", "-q"])
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
    text = tool_output(["jetson_clocks", "--show"])
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
