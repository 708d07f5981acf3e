"""A small stand-in robot for the deploy tests: real ZeroMQ publishers on the runtime's ipc
endpoints, emitting the follower/planner telemetry, state, plan and sim frame messages in
the wire format of runtime/ipc/messages.py. Run as a script:

    python tests/test_deploy_publisher.py RUN_DIR [--fault-after S] [--duration S]

The tests at the bottom check that what it sends is what the runtime codecs accept.
"""

from __future__ import annotations

import argparse
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from sim_arm import JOINTS, N_JOINTS

from runtime.ipc.messages import Encoder, decode, decode_plan, decode_state, pack_array


def follower_telemetry(ticks: int, mode: str, t: float) -> dict[str, Any]:
    q = np.array([math.sin(t + i) * 0.3 for i in range(N_JOINTS)], dtype=np.float32)
    err = np.array([0.001 * (i + 1) for i in range(N_JOINTS)], dtype=np.float32)
    return {
        "source": "follower", "mode": mode,
        "fault_reason": "bus errors past threshold" if mode == "FAULT" else None,
        "health": {"ok": mode != "FAULT", "achieved_hz": 499.7, "miss_ratio": 0.0,
                   "problems": ["FAULT: bus errors past threshold"] if mode == "FAULT" else []},
        "target_hz": 500.0, "achieved_hz": 499.7, "ticks": ticks, "deadline_misses": 3,
        "period_jitter_us": {"p50": 12.5, "p99": 87.25, "max": 140.0},
        "tick_compute_us": {"p50": 210.0, "p99": 390.0, "max": 612.0},
        "plan_age_ms": 120.0, "plan_delivery_us": {"p50": 95.0, "p99": 240.0},
        "bus": {"reads": ticks, "writes": ticks, "errors": 0, "retries": 1, "crc_errors": 0,
                "timeouts": 0},
        "safety": {"faults": int(mode == "FAULT"), "clamped_commands": 7, "estops": 0},
        "joint_names": JOINTS, "q": pack_array(q), "tracking_error": pack_array(err),
    }


def planner_telemetry(plans: int) -> dict[str, Any]:
    return {"source": "planner", "plans": plans, "achieved_hz": 5.0,
            "latency_ms": {"p50": 41.5, "p99": 63.0}, "camera_age_ms": 35.0,
            "instruction": "put the red cube in the bin", "status": "planning"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--fault-after", type=float, default=None)
    parser.add_argument("--duration", type=float, default=60.0)
    parser.add_argument("--state-hz", type=float, default=200.0)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ctx = zmq.Context.instance()
    socks = {}
    for name in ("telemetry-follower", "telemetry-planner", "state", "sim"):
        s = ctx.socket(zmq.PUB)
        s.setsockopt(zmq.LINGER, 0)
        s.bind(f"ipc://{run_dir}/{name}")
        socks[name] = s
    enc = {name: Encoder() for name in socks}
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    start = time.monotonic()
    period = 1.0 / args.state_hz
    ticks = plans = 0
    next_t = start
    image = np.zeros((96, 96, 3), dtype=np.uint8)
    print("publishing", flush=True)
    while time.monotonic() - start < args.duration:
        t = time.monotonic() - start
        faulted = args.fault_after is not None and t >= args.fault_after
        mode = "FAULT" if faulted else "TRACK"
        ticks += 1
        q = np.full(N_JOINTS, 0.1 * math.sin(t), dtype=np.float32)
        socks["state"].send(enc["state"].encode("state", {
            "q": pack_array(q), "dq": pack_array(np.zeros(N_JOINTS, np.float32)),
            "effort": pack_array(np.zeros(N_JOINTS, np.float32)), "mode": mode,
            "t_read_ns": time.monotonic_ns()}))
        if ticks % max(1, int(args.state_hz / 20)) == 0:
            socks["telemetry-follower"].send(enc["telemetry-follower"].encode(
                "telemetry", follower_telemetry(ticks, mode, t)))
        if ticks % max(1, int(args.state_hz / 5)) == 0:
            plans += 1
            socks["telemetry-planner"].send(enc["telemetry-planner"].encode(
                "telemetry", planner_telemetry(plans)))
            # plans travel to observers on the planner's telemetry socket
            socks["telemetry-planner"].send(enc["telemetry-planner"].encode("plan", {
                "waypoints": pack_array(np.zeros((10, N_JOINTS), np.float32)), "dt_s": 0.1,
                "t_obs_ns": time.monotonic_ns(), "latency_ms": 41.5}))
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
    return 0


def test_messages_decode_with_runtime_codecs() -> None:
    enc = Encoder()
    msg = decode(enc.encode("telemetry", follower_telemetry(10, "TRACK", 0.0)), "telemetry")
    assert msg["mode"] == "TRACK" and msg["joint_names"] == JOINTS
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
