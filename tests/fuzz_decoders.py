"""Coverage-guided fuzzing (atheris) of everything that decodes outside input: wire messages,
plans through the follower core's validation, requests through the request/reply server,
joint states, config YAML, bundle manifests and the planner server's observations. Each
target may only raise its own error type; anything else is a crash, saved by libFuzzer as
crash-<hash> in the working dir.

    make fuzz                       # every target, FUZZ_S seconds each (default 120)
    .venv/bin/python tests/fuzz_decoders.py --seconds 60 --target plan

Not a test (pytest does not collect it): tests/test_messages.py runs a short hypothesis
fuzz of the decoders in the suite; this runs the long, coverage-guided one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import atheris

with atheris.instrument_imports():
    import numpy as np

    from runtime.config import ConfigError, parse_yaml, validate
    from runtime.follower.core import CoreSettings, FollowerCore, PlanRejected
    from runtime.ipc.messages import MessageError, decode, decode_plan, decode_state
    from runtime.ipc.rpc import Command, ReplyServer, RequestError
    from runtime.model.bundle import BundleError, parse_manifest, validate_manifest
    from runtime.remote.wire import Limits, decode_observation

ROOT = Path(__file__).resolve().parents[1]
N = 6
NOW = 10**12


def _core() -> FollowerCore:
    from runtime.config import load_config

    core = FollowerCore(CoreSettings.from_config(load_config(ROOT / "configs/sim.yaml")))
    core.start(NOW - 10**9, np.zeros(N), None)
    return core


CORE = _core()


def _fail(args: dict) -> dict:
    raise RequestError("refused")


SERVER = ReplyServer(None, {  # type: ignore[arg-type]  # _handle never touches the socket
    "status": Command(lambda a: {"mode": "HOLD"}, "operator"),
    "estop": Command(lambda a: {"reason": str(a.get("reason"))[:100]}, "operator"),
    "set": Command(_fail)})


def plan(data: bytes) -> None:
    try:
        msg, w = decode_plan(data)
        CORE.offer_plan(w, float(msg["dt_s"]), msg["t_obs_ns"], NOW)
    except (MessageError, PlanRejected):
        pass


def message(data: bytes) -> None:
    try:
        decode(data)
    except MessageError:
        pass
    try:
        decode_state(data, N)
    except MessageError:
        pass


def request(data: bytes) -> None:
    role = ("operator", "admin", None)[data[0] % 3] if data else None
    reply = SERVER._handle(data[1:], role)
    assert isinstance(reply, dict) and reply["ok"] in (True, False)


def config(data: bytes) -> None:
    try:
        layer = parse_yaml(data, "fuzz.yaml")
        validate(layer, [("fuzz.yaml", layer)])
    except ConfigError:
        pass


def manifest(data: bytes) -> None:
    try:
        validate_manifest(parse_manifest(data, Path("fuzz/manifest.json")),
                          Path("fuzz/manifest.json"))
    except BundleError:
        pass


OBS_LIMITS = Limits(N, frozenset({"scene"}), 1 << 16, 256 * 256)


def observation(data: bytes) -> None:
    try:
        decode_observation(data, OBS_LIMITS)
    except MessageError:
        pass


TARGETS = {"plan": plan, "message": message, "request": request, "config": config,
           "manifest": manifest, "observation": observation}


def _seeds(target: str, corpus: Path) -> None:
    """Valid inputs to start from: what the code itself emits."""
    from runtime.ipc.messages import Encoder, pack_array
    from runtime.planner.observation import StateHistory
    from runtime.remote import jpeg
    from runtime.remote.wire import encode_observation

    corpus.mkdir(parents=True, exist_ok=True)
    enc = Encoder()
    w = np.zeros((10, N), np.float32)
    h = StateHistory(N)
    h.add(NOW, q=np.zeros(N), dq=np.zeros(N))
    obs = encode_observation(enc, bundle="b", t_obs_ns=NOW, states=h.rows_at([NOW]),
                             jpegs={"scene": jpeg.encode(np.zeros((16, 16, 3), np.uint8), 80)},
                             instruction="touch the red block", episode=1, previous=None,
                             previous_waypoints=None, expected_s=0.1)
    seeds = {
        "plan": [enc.encode("plan", {"waypoints": pack_array(w), "dt_s": 0.1,
                                     "t_obs_ns": NOW - 10**7, "latency_ms": 1.0})],
        "message": [enc.encode("state", {"q": pack_array(np.zeros(N)),
                                         "dq": pack_array(np.zeros(N)), "t_read_ns": 5})],
        "request": [b"\x00" + enc.encode("request", {"cmd": "estop", "args": {"reason": "x"}})],
        "config": [(ROOT / "configs/sim.yaml").read_bytes()],
        "manifest": [(ROOT / "bundles/reference/manifest.json").read_bytes()],
        "observation": [obs],
    }[target]
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=120, help="per target")
    ap.add_argument("--target", choices=sorted(TARGETS), help="one target (default: all)")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "fuzz")
    args, rest = ap.parse_known_args()
    if args.target is not None:  # the child: run libFuzzer on one target
        corpus = args.work / args.target
        _seeds(args.target, corpus)
        atheris.Setup([sys.argv[0], f"-max_total_time={args.seconds}", "-print_final_stats=1",
                       f"-artifact_prefix={args.work}/crash-{args.target}-", str(corpus),
                       *rest], TARGETS[args.target])
        atheris.Fuzz()
        return 0
    print(f"{'target':<10} {'inputs':>10} {'crashes':>8}")
    failed = 0
    for target in sorted(TARGETS):
        proc = subprocess.run([sys.executable, __file__, "--target", target, "--seconds",
                               str(args.seconds), "--work", str(args.work)], cwd=ROOT,
                              capture_output=True, text=True, env={**os.environ,
                                                                   "PYTHONPATH": str(ROOT)})
        runs = re.findall(r"stat::number_of_executed_units:\s+(\d+)", proc.stderr)
        crashes = 0 if proc.returncode == 0 else 1
        failed += crashes
        print(f"{target:<10} {runs[-1] if runs else '?':>10} {crashes:>8}")
        if crashes:
            print(proc.stderr[-3000:], file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
