"""The off-board planner: what the network path adds, and what one engine serves.

    .venv/bin/python -m bench.remote [--samples 600] [--seconds 20]

1. Added latency at no injected delay, for a 96x96 frame + joint state: a planner whose
   engine costs ~nothing (q + offsets, tests/onnx_bundle.py), so the figures are the paths
   themselves. Local: plan -> encode -> ipc PUB -> SUB, as the robot's own planner sends to
   its follower. Remote: JPEG + observation -> CURVE TCP (loopback) -> the planner server
   (another process: decode, plan, encode) -> the robot's checks -> the same ipc hop.
   Interleaved, one sample of each in turn; plaintext TCP for CURVE's share, and a bare
   ZeroMQ echo between two processes for what this host's scheduling costs any round trip.
   Then the path's own CPU time, in one process: what a quiet host would add.
2. Throughput: 8 simulated robots at 5 Hz on one engine, a flow planner (a conv encoder and
   a 10-step MLP flow head, bench/planner.py) exported three times with the same weights:
   batch 1 (sequential), a static batch of 8 (every call computes 8 rows) and a dynamic batch
   of up to 8 (a call computes the robots waiting); then the same robots at 100 Hz each,
   more than any serves, for the engine's ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

from bench.planner import flow_bundle
from bench.remote_robots import PlannerServerProcess, SimulatedRobot, make_keys, remote_config
from runtime.ipc.messages import Encoder, decode_plan, pack_array
from runtime.model.bundle import Bundle, load_bundle
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PlannerPipeline, state_times_ns
from runtime.remote import jpeg
from runtime.remote.wire import Limits, decode_observation, encode_observation, encode_plan

ROOT = Path(__file__).resolve().parents[1]
JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper"]


def _frame() -> np.ndarray:
    """A camera-like 96x96 image: smooth shading and two blocks (noise would not compress)."""
    y, x = np.mgrid[0:96, 0:96]
    img = np.stack([x * 2, y * 2, (x + y)], -1).astype(np.uint8)
    img[30:50, 40:60] = [200, 30, 30]
    img[60:75, 10:30] = [30, 30, 200]
    return img


def _stats(ms: list[float]) -> tuple[float, float]:
    a = np.asarray(ms)
    return float(np.median(a)), float(np.percentile(a, 99))


def added_latency(tmp: Path, samples: int) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from onnx_bundle import make_bundle  # type: ignore[import-not-found]  # costs ~nothing

    bundle_dir = make_bundle(tmp / "tiny")
    bundle = load_bundle(bundle_dir)
    keys = make_keys(tmp / "keys", ["robot"])
    servers = {"curve": PlannerServerProcess(tmp / "srv-curve", bundle_dir, keys,
                                             sets=["planner.serve.rate_hz=1000"]),
               "plaintext": PlannerServerProcess(tmp / "srv-plain", bundle_dir, None,
                                                 sets=["planner.serve.rate_hz=1000"])}
    frame = _frame()
    robots = {"curve": SimulatedRobot(remote_config(servers["curve"].endpoint, keys, "robot"),
                                      bundle, JOINTS, np.full(6, 0.1), frame),
              "plaintext": SimulatedRobot(remote_config(servers["plaintext"].endpoint, None,
                                                        "robot"), bundle, JOINTS,
                                          np.full(6, 0.1), frame)}
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    echo_server = subprocess.Popen([sys.executable, "-c", ECHO, f"ipc://{tmp}/echo-port"])
    echo = ctx.socket(zmq.DEALER)
    while not (tmp / "echo-port").exists():
        time.sleep(0.05)
    time.sleep(0.1)
    echo.connect(f"tcp://127.0.0.1:{(tmp / 'echo-port').read_text()}")
    echo_body = b"x" * 3000  # about an observation's size
    pub, sub = ctx.socket(zmq.PUB), ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    pub.bind(f"ipc://{tmp}/plan")  # the follower's plan socket, as on the robot
    sub.connect(f"ipc://{tmp}/plan")
    time.sleep(0.3)
    pipe = PlannerPipeline(bundle, JOINTS)
    pipe.set_instruction("touch the red block")
    enc = Encoder()
    history = StateHistory(6)

    def to_follower(w: np.ndarray, t_obs: int, packed: dict[str, object] | None) -> None:
        pub.send(enc.encode("plan", {"waypoints": packed or pack_array(w), "dt_s": 0.1,
                                     "t_obs_ns": t_obs, "latency_ms": 0.0, "episode": None}))
        decode_plan(sub.recv())

    def local() -> float:
        t0 = time.perf_counter_ns()
        history.add(time.monotonic_ns(), q=np.full(6, 0.1), dq=np.zeros(6))
        t = history.latest_t_ns
        w = pipe.plan(Observation({"scene": frame}, history, t))
        to_follower(w, t, None)
        return (time.perf_counter_ns() - t0) / 1e6

    def remote(r: SimulatedRobot) -> float:
        t0 = time.perf_counter_ns()
        assert r.observe()
        got: list = []
        while not got:
            got = r.receive(1000)
        a = got[-1]
        to_follower(a.waypoints, a.sent.t_obs_ns, a.packed)
        return (time.perf_counter_ns() - t0) / 1e6

    for r in robots.values():  # connected, warm
        while not r.observe():
            time.sleep(0.05)
        r.receive(2000)
    def bare() -> float:
        t0 = time.perf_counter_ns()
        echo.send(echo_body)
        echo.recv()
        return (time.perf_counter_ns() - t0) / 1e6

    results: dict[str, list[float]] = {"local ipc": [], "remote CURVE": [],
                                       "remote plaintext": [], "bare zmq TCP echo": []}
    for k in range(samples + 20):
        got = (local(), remote(robots["curve"]), remote(robots["plaintext"]), bare())
        if k >= 20:
            for name, v in zip(results, got, strict=True):
                results[name].append(v)
        time.sleep(0.01)
    cpu = _path_cpu(robots["curve"], bundle, frame)
    for r in robots.values():
        r.close()
    echo.close(linger=0)
    echo_server.kill()
    echo_server.wait()
    server_ms = {n: s.telemetry()["served_ms"] for n, s in servers.items()}
    for s in servers.values():
        s.stop()
    pub.close(linger=0)
    sub.close(linger=0)

    base = _stats(results["local ipc"])
    print(f"\n1. observation -> plan at the follower's socket, 96x96 frame + state, no injected "
          f"delay ({samples} interleaved samples, ms)")
    print(f"{'path':<18} {'p50':>7} {'p99':>7} {'added p50':>10} {'added p99':>10} "
          f"{'x local':>8}")
    for name, ms in results.items():
        p50, p99 = _stats(ms)
        print(f"{name:<18} {p50:>7.3f} {p99:>7.3f} {p50 - base[0]:>10.3f} "
              f"{p99 - base[1]:>10.3f} {p50 / base[0]:>8.2f}")
    print(f"   server's own share (receive -> send) p50: CURVE {server_ms['curve']['p50']} ms, "
          f"plaintext {server_ms['plaintext']['p50']} ms")
    print("   the remote path's CPU time in one process, p50 ms (no scheduling, no sockets): "
          + ", ".join(f"{k} {v:.3f}" for k, v in cpu.items()))


ECHO = """
import sys, zmq
s = zmq.Context().socket(zmq.ROUTER)
port = s.bind_to_random_port("tcp://127.0.0.1")
open(sys.argv[1].removeprefix("ipc://"), "w").write(str(port))
while True:
    s.send_multipart(s.recv_multipart())
"""


def _path_cpu(robot: SimulatedRobot, bundle: Bundle, frame: np.ndarray) -> dict[str, float]:
    """What the remote path computes beyond the local one, timed without any I/O."""
    lim = Limits(6, frozenset({"scene"}), 1 << 20, 1 << 24)
    enc = Encoder()
    pipe = PlannerPipeline(bundle, JOINTS)
    body = b""

    def observation() -> None:
        nonlocal body
        t = time.monotonic_ns()
        robot.history.add(t, q=robot.q, dq=np.zeros(6))
        body = encode_observation(
            enc, bundle=robot.bundle, t_obs_ns=t, jpegs={"scene": jpeg.encode(frame, 90)},
            states=robot.history.rows_at(state_times_ns(bundle.contract, t)),
            instruction="touch the red block", episode=None, previous=None,
            previous_waypoints=None, expected_s=0.0)

    observation()
    got = decode_observation(body, lim)
    w = pipe.plan(got.request.obs).copy()
    plan = encode_plan(enc, w, 0.1, got.request.obs.t_obs_ns, None, 1, 0.0)
    parts = {"JPEG encode": lambda: jpeg.encode(frame, 90),
             "observation encode (incl. JPEG)": observation,
             "observation decode (incl. JPEG)": lambda: decode_observation(body, lim),
             "plan encode + decode": lambda: decode_plan(
                 encode_plan(enc, w, 0.1, 1, None, 1, 0.0))}
    out = {k: _stats([_time_ms(f) for _ in range(300)])[0] for k, f in parts.items()}
    out["total"] = sum(v for k, v in out.items() if k != "JPEG encode")
    assert decode_plan(plan)[1].shape == w.shape
    return out


def _time_ms(f: object) -> float:
    t0 = time.perf_counter_ns()
    f()  # type: ignore[operator]
    return (time.perf_counter_ns() - t0) / 1e6


def fleet(server: PlannerServerProcess, bundle_dir: Path, keys: object, hz: float,
          seconds: float) -> dict[str, float]:
    """8 robots at `hz` each, phases spread over one period; what came back."""
    bundle = load_bundle(bundle_dir)
    robots = [SimulatedRobot(remote_config(server.endpoint, keys, f"robot-{i}"),  # type: ignore[arg-type]
                             bundle, JOINTS, np.full(6, 0.02 * i), _frame()) for i in range(8)]
    for r in robots:
        while not r.observe():
            time.sleep(0.05)
    time.sleep(1.0)
    for r in robots:
        r.receive()
        r.answers.clear()
        r.link.round_trip.count = 0
    period = 1.0 / hz
    start = time.monotonic()
    due = [start + i * period / 8 for i in range(8)]
    sent = 0
    poller = zmq.Poller()
    for r in robots:
        poller.register(r.link.sock, zmq.POLLIN)
    while time.monotonic() - start < seconds:
        now = time.monotonic()
        for i, r in enumerate(robots):
            if now >= due[i]:
                sent += r.observe()
                due[i] = max(due[i] + period, now)  # a late loop sends late, never a burst
        wait = max(0.0, min(due) - time.monotonic())
        poller.poll(round(wait * 1e3))
        for r in robots:
            r.receive()
    time.sleep(0.5)
    for r in robots:
        r.receive()
    rtt = np.concatenate([r.link.round_trip.values() for r in robots])
    plans = sum(len(r.answers) for r in robots)
    tel = server.telemetry()
    for r in robots:
        r.close()
    return {"sent_per_s": sent / seconds, "plans_per_s": plans / seconds,
            "answered": plans / max(sent, 1), "rtt_p50": float(np.median(rtt)),
            "rtt_p99": float(np.percentile(rtt, 99)),
            "batch_p50": tel["batch_size"]["p50"], "batch_max": tel["batch_size"]["max"]}


LOADS = (5.0, 100.0)  # observations per second and robot: the issue's, and past saturation


def throughput(tmp: Path, seconds: float) -> None:
    keys = make_keys(tmp / "fleet-keys", [f"robot-{i}" for i in range(8)])
    bundles = {}
    for name, batch, dynamic in (("sequential (batch 1)", 1, False),
                                 ("static batch 8", 8, False), ("dynamic batch <= 8", 8, True)):
        root = tmp / f"flow-{batch}{'d' if dynamic else 's'}"
        root.mkdir()
        with contextlib.redirect_stdout(io.StringIO()):
            bundles[name] = flow_bundle(root, batch, dynamic)
    rows: dict[tuple[str, float], dict[str, float]] = {}
    for name, path in bundles.items():
        server = PlannerServerProcess(tmp / f"srv-{path.name}", path, keys,
                                      sets=["planner.serve.rate_hz=200"])
        try:
            for hz in LOADS:
                rows[(name, hz)] = fleet(server, path, keys, hz, seconds if hz == 5 else 10)
        finally:
            server.stop()
    print("\n2. one engine (ONNX Runtime CPU, 1 thread), 8 robots, flow planner "
          "(conv encoder + 10 Euler steps)")
    print(f"{'engine':<22} {'offered':>8} {'plans/s':>8} {'answered':>9} {'RTT p50':>8} "
          f"{'RTT p99':>8} {'batch p50/max':>14}")
    for (name, _), r in rows.items():
        print(f"{name:<22} {r['sent_per_s']:>6.1f}/s {r['plans_per_s']:>8.1f} "
              f"{100 * r['answered']:>8.1f}% {r['rtt_p50']:>8.1f} {r['rtt_p99']:>8.1f} "
              f"{r['batch_p50']:>7.0f}/{r['batch_max']:<6.0f}")
    for hz in LOADS:
        seq = rows[("sequential (batch 1)", hz)]
        for name in ("static batch 8", "dynamic batch <= 8"):
            bat = rows[(name, hz)]
            print(f"   {hz:g} Hz each, {name} / sequential: plans/s x"
                  f"{bat['plans_per_s'] / seq['plans_per_s']:.2f}, RTT p50 x"
                  f"{bat['rtt_p50'] / seq['rtt_p50']:.2f}, p99 x"
                  f"{bat['rtt_p99'] / seq['rtt_p99']:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=600)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--skip-throughput", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        added_latency(Path(tmp), args.samples)
        if not args.skip_throughput:
            throughput(Path(tmp), args.seconds)


if __name__ == "__main__":
    main()
