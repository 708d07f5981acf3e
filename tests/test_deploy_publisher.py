"""A small stand-in robot for the deploy tests: real ZeroMQ publishers on the runtime's ipc
endpoints, emitting state, follower and planner telemetry, plans and sim frames in the wire
format of runtime/ipc/messages.py. The records are made by the runtime's own writers: the
follower's telemetry by its LoopFigures over a real FollowerCore (configs/sim.yaml) fed a
steady loop, the planner's by a real PlannerShell running a scripted source. Run as a script:

    python tests/test_deploy_publisher.py RUN_DIR [--fault-after S [--bus-error TEXT]]
        [--duration S]

The follower's loop ticks every PERIODS_US in turn (so: 496.9 Hz, jitter p50 10, p99 50 and
max 50 µs); the planner works on INSTRUCTION.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import zmq
from sim_arm import JOINTS, N_JOINTS, sim_config

from drivers.bus import BusStats
from runtime.config import DuetConfig
from runtime.follower.core import CoreSettings, FollowerCore
from runtime.follower.figures import LoopFigures
from runtime.follower.records import FollowerTelemetry
from runtime.ipc.messages import Encoder, decode, decode_plan, decode_state, pack_array
from runtime.planner.shell import PlannerShell, PlanSource

PERIODS_US = (2000.0, 2010.0, 1990.0, 2050.0)  # wake to wake, in turn
COMPUTE_US = 210.0
INSTRUCTION = "put the red cube in the bin"
FAULT_REASON = "bus errors past threshold"


def config(run_dir: Path) -> DuetConfig:
    cfg = sim_config()
    cfg.run_dir = str(run_dir)
    cfg.planner.task_source = "operator"
    cfg.planner.instruction = INSTRUCTION
    return cfg


class FollowerWriter:
    """The follower's telemetry as the follower makes it: a real core, a plan like a 5 Hz
    planner's every 200 ms, the loop's figures from PERIODS_US."""

    def __init__(self, cfg: DuetConfig) -> None:
        self.core = FollowerCore(CoreSettings.from_config(cfg), None)
        self.figures = LoopFigures(cfg)
        self.bus = BusStats()
        self.q = np.full(N_JOINTS, 0.2)
        self.dq = np.zeros(N_JOINTS)
        self.core.start(time.monotonic_ns(), self.q, None)
        self.next_plan_ns = 0

    def tick(self, t: float, fault: bool, bus_error: str | None = None) -> None:
        now = time.monotonic_ns()
        self.q[:] = 0.2 + 0.1 * math.sin(t)
        if now >= self.next_plan_ns:
            self.core.offer_plan(np.tile(self.q, (10, 1)), 0.1, now, now)
            self.next_plan_ns = now + 200_000_000
        self.core.step(now, self.q, self.dq)
        if fault and bus_error is not None:  # the follower's path for a failed bus read
            self.core.bus_failed(bus_error)
        elif fault:
            self.core.fault(FAULT_REASON)
        self.core.transitions.clear()  # the shell's to apply; nothing to apply here
        self.bus.reads += 1
        self.bus.writes += 1
        period = PERIODS_US[self.figures.ticks % len(PERIODS_US)]
        self.figures.tick(period, COMPUTE_US, missed=False)

    def telemetry(self) -> FollowerTelemetry:
        return self.figures.telemetry(self.core, self.bus, self.q, True, {})


class HoldSource(PlanSource):
    """Plans to hold the newest measured position: a plan source with no model."""

    def camera_names(self) -> Sequence[str]:
        return ()

    def check_instruction(self, text: str) -> None:
        pass

    def cycle(self, shell: PlannerShell) -> None:
        got = shell.observe()
        if got is not None:
            q = shell.history.latest("q").astype(float)
            shell.publish(np.tile(q, (10, 1)), 0.1, got[1], shell.episode)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--fault-after", type=float, default=None)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--bus-error", default=None, help="the fault is this bus read's error "
                        "(every tick from --fault-after), not FAULT_REASON")
    parser.add_argument("--state-hz", type=float, default=200.0)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = zmq.Context.instance()
    socks = {}
    for name in ("telemetry-follower", "state", "sim"):
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(f"ipc://{run_dir}/{name}")
        socks[name] = s
    enc = {name: Encoder() for name in socks}
    cfg = config(run_dir)
    follower = FollowerWriter(cfg)
    planner = PlannerShell(cfg, "publisher", HoldSource())  # binds telemetry-planner, task
    planning = threading.Thread(target=planner.run, args=(args.duration,), daemon=True)
    planning.start()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start = time.monotonic()
    period = 1.0 / args.state_hz
    ticks = 0
    next_t = start
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    print("publishing", flush=True)
    while time.monotonic() - start < args.duration:
        t = time.monotonic() - start
        faulted = args.fault_after is not None and t >= args.fault_after
        ticks += 1
        follower.tick(t, faulted, args.bus_error)
        mode = follower.core.mode.name
        q = follower.q.astype(np.float32)
        socks["state"].send(enc["state"].encode("state", {
            "q": pack_array(q), "dq": pack_array(np.zeros(N_JOINTS, np.float32)),
            "effort": pack_array(np.zeros(N_JOINTS, np.float32)), "mode": mode,
            "t_read_ns": time.monotonic_ns()}))
        if ticks % max(1, int(args.state_hz / 20)) == 0:
            socks["telemetry-follower"].send(enc["telemetry-follower"].encode(
                "telemetry", follower.telemetry()))
        if ticks % max(1, int(args.state_hz)) == 0:  # once a second: the sim's episode news
            episode = ticks // max(1, int(args.state_hz))
            socks["sim"].send(enc["sim"].encode("task", {
                "episode": episode, "instruction": "touch the red block"}))
            socks["sim"].send(enc["sim"].encode("episode", {
                "episode": episode - 1, "instruction": "touch the red block",
                "success": True, "reason": "success", "touched": ["red"],
                "duration_s": 1.0}))
        if ticks % max(1, int(args.state_hz / 10)) == 0:
            image[:] = ticks % 256
            socks["sim"].send(enc["sim"].encode("frame", {
                "image": pack_array(image), "capture_t_ns": time.monotonic_ns()}))
        next_t += period
        time.sleep(max(0.0, next_t - time.monotonic()))
    planner.stop_requested = True
    planning.join(timeout=5)
    return 0


def test_the_writers_records_decode_with_runtime_codecs(tmp_path: Path) -> None:
    enc = Encoder()
    follower = FollowerWriter(config(tmp_path))
    for k in range(400):
        follower.tick(k * 0.002, fault=False)
    msg = decode(enc.encode("telemetry", follower.telemetry()), "telemetry")
    assert msg["mode"] == "TRACK" and msg["joint_names"] == JOINTS
    assert msg["achieved_hz"] == round(1e6 / np.mean(PERIODS_US), 2)
    assert msg["period_jitter_us"]["max"] == 50.0  # |2050 - 2000|
    follower.tick(1.0, fault=True)
    assert follower.telemetry()["fault_reason"] == FAULT_REASON
    plan = enc.encode("plan", {"waypoints": pack_array(np.zeros((10, N_JOINTS), np.float32)),
                               "dt_s": 0.1, "t_obs_ns": 1, "latency_ms": 1.0})
    assert decode_plan(plan)[1].shape == (10, N_JOINTS)
    state = enc.encode("state", {"q": pack_array(np.zeros(N_JOINTS, np.float32)),
                                 "dq": pack_array(np.zeros(N_JOINTS, np.float32)),
                                 "effort": pack_array(np.zeros(N_JOINTS, np.float32)),
                                 "mode": "HOLD", "t_read_ns": 1})
    assert decode_state(state, N_JOINTS)[1].shape == (N_JOINTS,)


if __name__ == "__main__":
    sys.exit(main())
