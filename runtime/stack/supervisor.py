"""`duet run`: start sim (when configured), follower and planner; supervise; summarise.

On the robot systemd supervises the two processes; this is the same arrangement for
development and tests. The supervisor is the children's NOTIFY_SOCKET, so the follower's
readiness travels the same sd_notify path it takes under systemd.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import yaml

from drivers.families import family_of
from runtime.config import ConfigError, DuetConfig, config_to_dict
from runtime.follower.cores import CoreClaim, claim_core
from runtime.ipc import endpoints, rundir
from runtime.ipc.signals import SUPERVISOR_ENV, stop_on_signals
from runtime.stack.summary import build_summary, print_summary

log = logging.getLogger("duet.run")

READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 8.0
PLANNER_RESTART_BACKOFF_S = 1.0
# A child's exit code asking for the follower's and the planner's restart: the activation
# watch (`duet bundle watch --restart-by-exit`) rolled the bundle back
RESTART_STACK_EXIT = 3


class SupervisorError(Exception):
    pass


class Refused(SupervisorError):
    """Another stack holds the run dir: nothing was started, so there is nothing to sum up."""


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "runtime.cli", *args]


class Supervisor:
    def __init__(self, cfg: DuetConfig, config_label: str, record: bool = False,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.cfg = cfg
        self.record = record
        self.config_label = config_label
        self.ready_timeout_s = ready_timeout_s
        self.run_dir = Path(cfg.run_dir)
        self.children_stdout: int | None = None  # theirs (None: ours)
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.planner_restarts = 0
        self.stop_requested = False
        self.t_start_ns = time.monotonic_ns()
        self.notify_sock: socket.socket | None = None
        self.ready: set[str] = set()
        self.others_cpus: set[int] = set()
        self.core = CoreClaim(None, None, None)  # the follower's core, claimed across stacks
        self.lock: rundir.RunLock | None = None

    # ------------------------------------------------------------ plumbing
    def _prepare_run_dir(self) -> Path:
        rundir.prepare(self.run_dir)
        try:  # one stack per run dir: a second `duet run` (or a live follower) refuses
            self.lock = rundir.RunLock(self.run_dir, endpoints.SUPERVISOR_LOCK).acquire()
        except rundir.LockHeld as exc:
            raise Refused(str(exc)) from None
        held, pid = rundir.holder(self.run_dir, endpoints.FOLLOWER_LOCK)
        if held:
            raise Refused(f"a follower (pid {pid or '?'}) is running on {self.run_dir}: "
                                  "stop it first, or use another run dir")
        stale = [endpoints.NOTIFY_SOCKET, endpoints.FOLLOWER_SUMMARY, endpoints.PLANNER_SUMMARY,
                 endpoints.SIM_SUMMARY]
        if self.cfg.sim is not None and self.cfg.sim.enabled:
            stale.append(endpoints.LATCH)  # a fresh simulated robot starts unlatched
        for name in stale:
            (self.run_dir / name).unlink(missing_ok=True)
        self.notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify_sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.notify_sock.bind(str(self.run_dir / endpoints.NOTIFY_SOCKET))
        self.notify_sock.settimeout(0.1)
        path = self.run_dir / endpoints.EFFECTIVE_CONFIG
        path.write_text(yaml.safe_dump(config_to_dict(self.cfg), sort_keys=False))
        return path

    def _env(self, name: str) -> dict[str, str]:
        env = dict(os.environ)
        env["NOTIFY_SOCKET"] = str(self.run_dir / endpoints.NOTIFY_SOCKET)
        env["DUET_PROCESS"] = name
        env[SUPERVISOR_ENV] = str(os.getpid())  # they stop if this process dies unasked
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _spawn(self, name: str, args: list[str], stdout: int | None = None,
               stdin: int | None = None) -> None:
        proc = subprocess.Popen(
            _cli(*args), env=self._env(name), start_new_session=True, stdin=stdin,
            stdout=self.children_stdout if stdout is None else stdout)
        self.children[name] = proc
        if name != "follower" and self.others_cpus:
            # set while the child is still starting its interpreter: its threads and its
            # own children (the sim's servo process) inherit it
            os.sched_setaffinity(proc.pid, self.others_cpus)

    def _reserve_follower_cpu(self) -> None:
        """With follower.realtime.cpu set, claim a core for the follower (that one, or a free
        one when another stack's follower has it: runtime/follower/cores.py) and keep the sim
        and the planner off it (as CPUAffinity= of the other units does on the robot)."""
        self.core = claim_core(self.cfg.follower.realtime.cpu)
        if self.core.report:
            log.warning("%s", self.core.report)
        cpu = self.core.cpu
        allowed = os.sched_getaffinity(0)
        self.others_cpus = allowed - {cpu} if cpu in allowed and len(allowed) > 1 else set()
        if self.others_cpus:
            log.info("cpu %d kept for the follower; sim and planner on %s", cpu,
                     ",".join(map(str, sorted(self.others_cpus))))

    def _poll_notify(self) -> None:
        """Read sd_notify datagrams; SO_PASSCRED tells which child sent each (as systemd does)."""
        assert self.notify_sock is not None
        names = {p.pid: n for n, p in self.children.items()}
        while True:
            try:
                data, ancdata, _, _ = self.notify_sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (TimeoutError, BlockingIOError):
                return
            pid = 0
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                    pid = struct.unpack("3i", payload[:12])[0]
            name = names.get(pid)
            if name is not None and b"READY=1" in data.split(b"\n"):
                self.ready.add(name)
            self.notify_sock.settimeout(0.0)

    # ------------------------------------------------------------ lifecycle
    def start(self, with_planner: bool = True) -> None:
        effective = self._prepare_run_dir()
        self._reserve_follower_cpu()
        # The planner needs no bus: it loads its engines while the sim and the follower come
        # up, and plans once it has frames and a joint state (no ordering needed).
        self.planner_args = ["planner", "--config", str(effective)]
        if with_planner:
            self._spawn("planner", self.planner_args)
        overrides: list[str] = []
        sim = self.cfg.sim is not None and self.cfg.sim.enabled
        wire = None
        if sim:
            self._spawn("sim", ["sim", "--config", str(effective)], stdout=subprocess.PIPE)
            wire = self._sim_wire()
            if wire is not None:
                overrides.append(f"bus.{wire[0]}={wire[1]}")
        if self.core.cpu != self.cfg.follower.realtime.cpu:
            overrides.append(f"follower.realtime.cpu={self.core.cpu}")
        sets = [a for o in overrides for a in ("--set", o)]
        self.follower_args = ["follower", "--config", str(effective), *sets]
        if sim:
            # The follower loads its bundle, engine and sockets while the sim comes up, and
            # opens the bus on the line that says the motors are served (systemd orders a
            # robot's follower after its device instead): the two starts overlap.
            self._spawn("follower", [*self.follower_args, "--bus-after-stdin"],
                        stdin=subprocess.PIPE)
            line = _read_first_line(self.children["sim"], self.ready_timeout_s)
            if wire is not None and line != wire[1]:
                raise SupervisorError(f"the sim serves its motors on {line}, not {wire[1]}")
            self.device = line
            log.info("sim robot on %s", line)
            gate = self.children["follower"].stdin
            assert gate is not None
            with contextlib.suppress(BrokenPipeError):  # it died: _wait_ready says how
                gate.write(b"served\n")
                gate.close()
        else:
            self._spawn("follower", self.follower_args)
        if self.record:  # the flight recorder, as duet-recorder.service on the robot
            self.recorder_args = ["record", "serve", "--config", str(effective)]
            self._spawn("recorder", self.recorder_args)
        bundle = Path(self.cfg.bundle.path)
        if with_planner and bundle.name == "current":
            # a store's current bundle: the activation watch, as duet-watch.service does on
            # the robot (it exits at once when no activation is pending)
            self._spawn("watch", ["bundle", "watch", "--config", str(effective), "--store",
                                  str(bundle.parent), "--restart-by-exit"])
        self._wait_ready("follower")

    def _sim_wire(self) -> tuple[str, str] | None:
        """(bus key, value) of the wire the sim serves the one `bus:` on: a serial family's
        pty link in the run dir, a CAN family's configured channel. None for per-limb buses
        (the sim serves the configured ones)."""
        if self.cfg.bus is None:
            return None
        family = family_of(self.cfg.bus)
        if family.sim_transport == "serial":
            return family.wire_key, str(self.run_dir / endpoints.SIM_TTY)
        return family.wire_key, str(getattr(self.cfg.bus, family.wire_key))

    def _wait_ready(self, name: str) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        assert self.notify_sock is not None
        self.notify_sock.settimeout(0.1)
        while name not in self.ready:
            if self.children[name].poll() is not None:
                raise SupervisorError(f"{name} exited with {self.children[name].returncode} "
                                      "before it was ready")
            if time.monotonic() > deadline:
                raise SupervisorError(f"{name} not ready within {self.ready_timeout_s:g} s")
            self._poll_notify()
            self.notify_sock.settimeout(0.1)

    def supervise(self, duration_s: float | None) -> int:
        end = None if duration_s is None else time.monotonic() + duration_s
        while not self.stop_requested and (end is None or time.monotonic() < end):
            time.sleep(0.05)
            self._poll_notify()  # keep draining: a full notify socket drops WATCHDOG/STATUS
            if self.children["follower"].poll() is not None:
                log.error("follower exited with %s", self.children["follower"].returncode)
                return 1
            if "sim" in self.children and self.children["sim"].poll() is not None:
                log.error("sim exited with %s", self.children["sim"].returncode)
                return 1
            planner = self.children["planner"]
            if planner.poll() is not None:
                # systemd restarts the planner independently; the follower holds meanwhile
                log.warning("planner exited with %s; restarting", planner.returncode)
                self.planner_restarts += 1
                time.sleep(PLANNER_RESTART_BACKOFF_S)
                self._spawn("planner", self.planner_args)
            watch = self.children.get("watch")
            if watch is not None and watch.poll() is not None:
                del self.children["watch"]
                if watch.returncode == RESTART_STACK_EXIT:
                    self._restart_robot("the activation watch rolled the bundle back")
            recorder = self.children.get("recorder")
            if recorder is not None and recorder.poll() is not None:
                log.warning("recorder exited with %s; restarting", recorder.returncode)
                time.sleep(PLANNER_RESTART_BACKOFF_S)
                self._spawn("recorder", self.recorder_args)
        return 0

    def _restart_robot(self, why: str) -> None:
        """Stop the planner and the follower (controlled stop) and start them again: they
        load the bundle now current."""
        log.warning("restarting the follower and the planner: %s", why)
        for name in ("planner", "follower"):
            self._stop_child(name)
        self.ready.discard("follower")
        self._spawn("follower", self.follower_args)
        self._wait_ready("follower")
        self._spawn("planner", self.planner_args)

    def _stop_child(self, name: str) -> int | None:
        """SIGTERM, then SIGKILL after STOP_TIMEOUT_S; its exit code (0 when our SIGTERM
        ended it before it had installed its handler: still starting, a stop as asked)."""
        proc = self.children[name]
        asked = proc.poll() is None
        if asked:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s; killing", name, STOP_TIMEOUT_S)
                proc.kill()
                proc.wait()
        code = proc.returncode
        return 0 if asked and code == -signal.SIGTERM else code

    def stop(self) -> dict[str, int | None]:
        """SIGTERM in dependency order: the watch, planner, follower (controlled stop), the
        recorder (after the follower's last state), sim."""
        codes: dict[str, int | None] = {}
        for name in ("watch", "planner", "follower", "recorder", "sim"):
            if name in self.children:
                codes[name] = self._stop_child(name)
        if self.notify_sock is not None:
            self.notify_sock.close()
        self.core.release()
        if self.lock is not None:
            self.lock.release()
        return codes


def _read_first_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    """The sim prints its device path first; everything after is forwarded to stderr."""
    assert proc.stdout is not None
    result: list[str] = []

    def reader(stream: IO[bytes]) -> None:
        first = stream.readline().decode().strip()
        result.append(first)
        for line in stream:  # keep draining after a hangup, or the sim blocks on a full pipe
            with contextlib.suppress(OSError):
                sys.stderr.write("[sim] " + line.decode(errors="replace"))

    thread = threading.Thread(target=reader, args=(proc.stdout,), daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s
    while not result:
        if proc.poll() is not None:
            raise SupervisorError(f"sim exited with {proc.returncode} before printing its device")
        if time.monotonic() > deadline:
            raise SupervisorError(f"sim printed no device within {timeout_s:g} s")
        time.sleep(0.01)
    if not result[0]:
        raise SupervisorError("sim printed an empty first line instead of its device")
    return result[0]


def run(cfg: DuetConfig, config_label: str, duration_s: float | None,
        summary_json: str | None, record: bool | None = None,
        ready_timeout_s: float | None = None, as_json: bool = False) -> int:
    """`record`: start the recorder (None: as recorder.enabled says). `as_json`: the summary
    as one JSON object on stdout, which then carries nothing else."""
    sup = Supervisor(cfg, config_label, cfg.recorder.enabled if record is None else record,
                     ready_timeout_s or READY_TIMEOUT_S)
    if as_json:
        sup.children_stdout = sys.stderr.fileno()

    stop_on_signals(sup)  # Ctrl-C, SIGTERM (duet stop) and SIGHUP (the SSH session dropped)
    t0 = time.monotonic()
    rc = 0
    try:
        sup.start()
        rc = sup.supervise(duration_s)
    except Refused as exc:  # `finally` releases what was opened; no summary of another stack
        log.error("duet run refused: %s", exc)
        return 2
    except (SupervisorError, ConfigError) as exc:
        log.error("%s", exc)
        rc = 2
    finally:
        codes = sup.stop()
    if any(code not in (0, None) for name, code in codes.items()
           if name not in ("planner", "recorder", "watch")):
        rc = rc or 1
    summary = build_summary(cfg, config_label, Path(cfg.run_dir), time.monotonic() - t0,
                            sup.t_start_ns, sup.planner_restarts, codes)
    if not summary["outcome"]["ok"]:
        rc = rc or 1  # ended in FAULT/ESTOP: never a silent success
    if summary_json:  # first: after a hangup the terminal below may be gone
        Path(summary_json).parent.mkdir(parents=True, exist_ok=True)
        Path(summary_json).write_text(json.dumps(summary, indent=2))
    try:
        if as_json:
            print(json.dumps(summary, indent=2), flush=True)
        else:
            print_summary(summary)
    except OSError:  # EIO/EPIPE: the terminal that started us hung up
        pass
    return rc
