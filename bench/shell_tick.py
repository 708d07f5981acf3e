"""The follower process shell around the core, without the bus: the real `Follower` loop
(sockets, plan receive, state and telemetry publishing, figures) on an instant in-memory bus,
so `logic_us` and the tick are the shell's and the core's alone, not an emulator's. With
`--baseline-tree`, the `Follower` class of another checkout (e.g. the previous commit) runs in
the same process in alternate rounds: a before/after under the same host state.

    .venv/bin/python -m bench.shell_tick [--seconds 5] [--rounds 3] [--baseline-tree DIR]

A planner stand-in (a child process) publishes a plan every 200 ms, as a 5 Hz planner does
(`--plan-hz` for more samples of plan delivery, planner send -> follower take). `--read-us`
makes each bus read wait that long (a serial round trip: a plan arriving then waits for it).
Run pinned and real-time for stable figures: `chrt -f 50 taskset -c 1 ...`.
"""

from __future__ import annotations

import argparse
import importlib.util
import multiprocessing as mp
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import zmq

from drivers.bus import BusStats, MotorState
from runtime.config import DuetConfig, load_config
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, pack_array

ROOT = Path(__file__).resolve().parents[1]
HOME = np.array([0.0, 0.02, 1.82, 1.33, 0.0, 0.1])


class InstantBus:
    """Motors that reach each command at once: a read returns the last command."""

    def __init__(self, joints: list[str], read_s: float = 0.0) -> None:
        self.joint_names = joints
        self.read_s = read_s
        self._stats = BusStats()
        self.q = HOME.copy()

    @property
    def stats(self) -> BusStats:
        return self._stats

    def open(self) -> None:
        pass

    def enable_torque(self, on: bool) -> None:
        pass

    def read(self, out: MotorState) -> None:
        if self.read_s:
            time.sleep(self.read_s)  # the driver waits for the reply off the CPU
        out.q[:] = self.q
        out.dq.fill(0.0)
        out.t_ns = time.monotonic_ns()
        self._stats.reads += 1

    def write(self, q_target: np.ndarray, kp: Any = None, kd: Any = None,
              tau_ff: Any = None) -> None:
        self.q[:] = q_target
        self._stats.writes += 1

    def present_goal(self, out: np.ndarray) -> bool:
        out[:] = self.q
        return True

    def close(self) -> None:
        pass

    def wire_time_us(self) -> float:
        return 0.0


def planner(run_dir: str, stop: Any, period_s: float) -> None:
    """A planner: a plan around the home pose every `period_s`."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.connect(endpoints.plan(run_dir))
    enc, rng = Encoder(), np.random.default_rng(0)
    seq = 0
    while not stop.is_set():
        w = HOME + np.cumsum(rng.normal(0, 0.005, (10, 6)), axis=0)
        now = time.monotonic_ns()
        pub.send(enc.encode("plan", {"waypoints": pack_array(w.astype("<f4")), "dt_s": 0.1,
                                     "t_obs_ns": now - 3_000_000, "latency_ms": 3.0,
                                     "episode": 0, "plan_seq": seq}))
        seq += 1
        stop.wait(period_s)
    pub.close(linger=0)
    ctx.term()


def load_process_module(tree: Path) -> ModuleType:
    """runtime/follower/process.py of another checkout, under its own name (it imports this
    tree's other modules: the shell is what differs)."""
    spec = importlib.util.spec_from_file_location(
        "baseline_follower_process", tree / "runtime/follower/process.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_once(module: ModuleType, cfg: DuetConfig, seconds: float, plan_hz: float,
             read_us: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="duet-shell-") as run_dir:
        cfg = cfg.model_copy(deep=True)
        cfg.run_dir = run_dir
        follower = module.Follower(cfg, bus=InstantBus(list(cfg.robot.joints), read_us / 1e6))
        stop = mp.get_context("fork").Event()
        child = mp.get_context("fork").Process(target=planner, args=(run_dir, stop, 1.0 / plan_hz))
        child.start()
        try:
            follower.start()
            follower.run(seconds)
            summary = follower.summary()
        finally:
            stop.set()
            child.join()
            follower.close()
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0, help="per round and tree")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--hz", type=float, default=500.0)
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--spin-us", type=float, default=None, help="follower.spin_us")
    ap.add_argument("--plan-hz", type=float, default=5.0)
    ap.add_argument("--read-us", type=float, default=0.0, help="each bus read waits this long")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs/sim.yaml")
    cfg.follower.hz = args.hz
    if args.spin_us is not None:
        cfg.follower.spin_us = args.spin_us
    cfg.follower.realtime.sched_fifo_priority = 0  # the caller's chrt/taskset decide
    cfg.follower.realtime.cpu = None
    from runtime.follower import process
    trees: list[tuple[str, ModuleType]] = []
    if args.baseline_tree is not None:
        trees.append((f"baseline ({args.baseline_tree.name})",
                      load_process_module(args.baseline_tree.resolve())))
    trees.append(("this tree", process))
    rows: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in trees}
    for _ in range(args.rounds):
        for label, module in trees:
            rows[label].append(run_once(module, cfg, args.seconds, args.plan_hz, args.read_us))
    print(f"follower shell on an instant bus, {args.hz:g} Hz, {args.rounds} x {args.seconds:g} s "
          "per tree, alternated; per round p50/p99 µs")
    print(f"{'tree':<22} {'logic_us':>22} {'tick compute':>22} {'plan delivery':>26} "
          f"{'misses':>8} {'plans':>6} {'modes'}")
    for label, summaries in rows.items():
        logic = ", ".join(f"{s['logic_us']['p50']}/{s['logic_us']['p99']}" for s in summaries)
        comp = ", ".join(f"{s['tick_compute_us']['p50']}/{s['tick_compute_us']['p99']}"
                         for s in summaries)
        delivery = ", ".join(f"{s['plan_delivery_us']['p50']}/{s['plan_delivery_us']['p99']}"
                             for s in summaries)
        misses = sum(s["deadline_misses"] for s in summaries)
        plans = sum(s["plans_received"] for s in summaries)
        modes = summaries[-1]["mode_counts"]
        print(f"{label:<22} {logic:>22} {comp:>22} {delivery:>26} {misses:>8} {plans:>6} "
              f"{modes}")


if __name__ == "__main__":
    main()
