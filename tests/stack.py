"""Test harness: the real stack (sim, follower, planner as separate processes over real
sockets and a real pty), started the way `duet run` starts it, with handles on each child."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from drivers.can_loopback import free_channel
from runtime.config import DuetConfig, load_config
from runtime.ipc import endpoints
from runtime.ipc.messages import decode, unpack_array
from runtime.ipc.rpc import request_at
from runtime.stack.supervisor import Supervisor

REPO = Path(__file__).resolve().parents[1]


def own_can_ports(cfg: DuetConfig) -> None:
    """Fresh loopback ports for each `duet-udp` CAN bus: the shipped configs' fixed ports would
    join two stacks that tests run side by side into one bus."""
    for bus in cfg.buses or ([cfg.bus] if cfg.bus is not None else []):
        if getattr(bus, "interface", None) == "duet-udp":
            bus.channel = free_channel()  # type: ignore[union-attr]


class Stack:
    def __init__(self, tmp: Path, bundle: Path, overrides: list[str] | None = None,
                 planner: bool = True, config: str = "sim.yaml", record: bool = False) -> None:
        os.environ.setdefault("MUJOCO_GL", "egl")
        # A shared 2-core test machine (a VM: its CPUs are taken away for milliseconds at a
        # time) has bursts of late ticks and late motor answers that a robot's dedicated core
        # does not: these tests check behaviour, not timing, so the deadline-miss storm is
        # tolerant here (80 % of a window late) and a bus FAULT takes 25 failed exchanges in a
        # row, not 5 (a silent motor still faults within 0.2 s); a test may set its own.
        sets = [f"run_dir={tmp / 'run'}", f"bundle.path={bundle}",
                "follower.deadline_storm.misses=400", "follower.bus_error_threshold=25",
                *(overrides or [])]
        self.cfg: DuetConfig = load_config(REPO / "configs" / config, None, sets)
        own_can_ports(self.cfg)
        self.sup = Supervisor(self.cfg, "test", record=record)
        self.with_planner = planner
        self.ctx = zmq.Context.instance()
        self.tel = self.ctx.socket(zmq.SUB)
        self.tel.setsockopt(zmq.SUBSCRIBE, b"")
        self.tel.setsockopt(zmq.RCVHWM, 1000)

    def __enter__(self) -> Stack:
        try:
            self.sup.start(with_planner=self.with_planner)
        except BaseException:
            self.sup.stop()  # never leak a half-started stack (ports, ptys) into later tests
            raise
        self.tel.connect(endpoints.telemetry(self.cfg.run_dir, "follower"))
        return self

    def __exit__(self, *exc: Any) -> None:
        self.tel.close(linger=0)
        self.codes = self.sup.stop()

    @property
    def run_dir(self) -> str:
        return self.cfg.run_dir

    def pid(self, name: str) -> int:
        return self.sup.children[name].pid

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.pid(name), sig)

    def control(self, cmd: str, **args: Any) -> dict[str, Any]:
        return request_at(endpoints.control(self.run_dir), cmd, args, timeout_s=5.0)

    def sim_fault(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Break (or mend) the sim robot through its fault-injection socket."""
        reply = request_at(endpoints.sim_control(self.run_dir), cmd, args, timeout_s=5.0)
        assert reply["ok"], reply
        return reply

    def telemetry(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """The newest follower telemetry sample (drains older ones)."""
        deadline = time.monotonic() + timeout_s
        msg = None
        while time.monotonic() < deadline:
            if self.tel.poll(50):
                while True:
                    try:
                        msg = decode(self.tel.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                return msg  # type: ignore[return-value]
        raise TimeoutError("no follower telemetry")

    def wait_mode(self, mode: str, timeout_s: float) -> float:
        """Seconds until telemetry reports `mode`; TimeoutError otherwise."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.telemetry()["mode"] == mode:
                return time.monotonic() - t0
        raise TimeoutError(f"follower not in {mode} within {timeout_s} s "
                           f"(last: {self.telemetry()['mode']})")

    def q(self) -> np.ndarray:
        return np.array(unpack_array(self.telemetry()["q"], "q"))


def stop_and_cont(stack: Stack, name: str, seconds: float) -> None:
    stack.signal(name, signal.SIGSTOP)
    time.sleep(seconds)
    stack.signal(name, signal.SIGCONT)


def stop_processes(*procs: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM each process still running; SIGKILL one that has not exited 10 s later."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
