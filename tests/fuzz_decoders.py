"""Coverage-guided fuzzing (atheris) of everything that decodes outside input: wire messages,
plans through the follower core's validation, requests through the request/reply server,
joint states, config YAML (files and `--set` overrides, YAML tags included), bundle manifests,
the planner server's observations and MIT-mode CAN frames (host and motor side). Each
target may only raise its own error type; anything else is a crash, saved by libFuzzer as
crash-<hash> in the working dir.

    make fuzz                       # every target, FUZZ_S seconds each (default 120)
    .venv/bin/python tests/fuzz_decoders.py --seconds 60 --targets plan mit_can --jobs 2

Not a test (pytest does not collect it): tests/test_messages.py runs a short hypothesis
fuzz of the decoders in the suite; this runs the long, coverage-guided one.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import atheris

# Coverage feedback from duet's own code and the pure-Python parsers it feeds (PyYAML, python-can's
# Message); numpy, pydantic and the rest run uninstrumented: instrumenting them cost minutes of
# start-up and most of each input's time, for branches no input here steers.
with atheris.instrument_imports(include=["runtime", "drivers", "sim", "yaml", "can"]):
    import can
    import numpy as np

    from drivers import feetech_protocol as ft
    from drivers.bus import BusError
    from drivers.can_mit import MitCanBus
    from drivers.mit_codec import MitRanges
    from drivers.mit_dialects import DIALECTS
    from runtime.config import (
        ConfigError,
        file_layer,
        override_layer,
        parse_yaml,
        validate,
        validate_layers,
    )
    from runtime.follower.core import CoreSettings, FollowerCore, PlanRejected
    from runtime.ipc.messages import MessageError, decode, decode_plan, decode_state
    from runtime.ipc.rpc import Command, ReplyServer, RequestError
    from runtime.model.bundle import BundleError, parse_manifest, validate_manifest
    from runtime.remote.wire import Limits, decode_observation
    from sim.actuators import Actuators
    from sim.can_emulator import MitCanEmulator

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


SIM_LAYER = file_layer(ROOT / "configs/sim.yaml")


def override(data: bytes) -> None:
    """`--set KEY=VALUE` lines (any YAML, tags included) over the sim config."""
    try:
        lines = data.decode("utf-8").splitlines()
        validate_layers([SIM_LAYER, override_layer(lines)])
    except (UnicodeDecodeError, ConfigError):
        pass


class _Wire:
    """A CAN bus that delivers the frames put on it, then silence (no waiting)."""

    def __init__(self) -> None:
        self.frames: list[can.Message] = []

    def recv(self, timeout: float | None = None) -> can.Message | None:
        return self.frames.pop() if self.frames else None

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        pass

    def shutdown(self) -> None:
        pass


MIT_IDS = [1, 2, 3, 4, 5, 6]
MIT_RANGES = MitRanges(12.5, 30.0, 10.0)
WIRE = _Wire()
MIT_BUSES = [MitCanBus([f"j{i}" for i in MIT_IDS], MIT_IDS, MIT_RANGES, [20.0] * N, [1.0] * N,
                       dialect=name, bus=WIRE) for name in sorted(DIALECTS)]
MIT_MOTORS = [MitCanEmulator(Actuators(N), MIT_IDS, MIT_RANGES, WIRE, dialect=name)  # type: ignore[arg-type]
              for name in sorted(DIALECTS)]


def mit_can(data: bytes) -> None:
    """CAN frames with any flags, dlc, id and data (a dlc beyond the data included) through
    each dialect's host side (the bus's reply collection, register reads, fault check) and
    motor side (the sim's emulated motors)."""
    fdp = atheris.FuzzedDataProvider(data)
    frames = []
    while fdp.remaining_bytes() and len(frames) < 16:
        flags = fdp.ConsumeIntInRange(0, 15)
        frames.append(can.Message(
            arbitration_id=fdp.ConsumeIntInRange(0, (1 << 29) - 1 if flags & 1 else 0x7FF),
            is_extended_id=bool(flags & 1), is_remote_frame=bool(flags & 2),
            is_error_frame=bool(flags & 4), is_fd=bool(flags & 8),
            dlc=fdp.ConsumeIntInRange(0, 64), data=fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64))))
    for bus, motors in zip(MIT_BUSES, MIT_MOTORS, strict=True):
        WIRE.frames = frames[::-1]
        bus._expect[:] = True
        try:
            bus._collect()
        except BusError:
            pass
        try:
            bus._raise_faults(None)
        except BusError:
            pass
        WIRE.frames = frames[::-1]
        bus._collect_registers(21, [None] * N)
        for msg in frames:
            motors.handle(msg)


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


def feetech(data: bytes) -> None:
    """Servo replies off a Feetech line: the stream parser and the sync-read resync parser
    (the bytes split where the first byte says, as a serial read splits them)."""
    parser = ft.StreamParser()
    cut = data[0] % (len(data) + 1) if data else 0
    parser.feed(data[:cut])
    list(parser)
    parser.feed(data[cut:])
    list(parser)
    replies = ft.SyncReplyParser([1, 2, 3, 4, 5, 6], 8)
    rx = bytearray(data) + bytearray(16)
    replies.feed(rx, cut)
    replies.feed(rx, len(data))


TARGETS = {"plan": plan, "message": message, "request": request, "config": config,
           "override": override, "manifest": manifest, "observation": observation,
           "mit_can": mit_can, "feetech": feetech}


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
        "config": [(ROOT / "configs/sim.yaml").read_bytes(),
                   b"follower: {hz: !!float 100, blend_ms: !!timestamp 2026-12-01}\n"
                   b"robot: {name: !!binary aGk=, joints: !!set {a, b}}\n"],
        "override": [b"follower.hz=!!int 0x1F\nrobot.name=!!timestamp x\n"
                     b"bus.ids=[1, 2, 3, 4, 5, 5]\nfollower.blend_ms=!!bool yes\n"],
        "mit_can": [bytes([0, 8, 0, 8]) + bytes(8), bytes([8, 64, 0x7F, 3]) + bytes(3)],
        "manifest": [(ROOT / "bundles/reference/manifest.json").read_bytes()],
        "observation": [obs],
        "feetech": [bytes([6]) + b"".join(ft.status_packet(i, 0, bytes(8)) for i in range(1, 7))],
    }[target]
    for i, seed in enumerate(seeds):
        (corpus / f"seed-{i}").write_bytes(seed)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=120, help="per target")
    ap.add_argument("--target", choices=sorted(TARGETS), help=argparse.SUPPRESS)  # the child
    ap.add_argument("--targets", nargs="+", choices=sorted(TARGETS), help="default: all")
    ap.add_argument("--jobs", type=int, default=1, help="targets fuzzed side by side")
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
    targets = args.targets or sorted(TARGETS)
    args.work.mkdir(parents=True, exist_ok=True)
    running: list[tuple[str, subprocess.Popen[bytes]]] = []
    results: dict[str, tuple[str, int]] = {}

    def finish(target: str, proc: subprocess.Popen[bytes]) -> None:
        log = (args.work / f"{target}.log").read_text(errors="replace")
        runs = re.findall(r"stat::number_of_executed_units:\s+(\d+)", log)
        results[target] = (runs[-1] if runs else "?", 0 if proc.returncode == 0 else 1)
        if proc.returncode:
            print(f"{target}: exit {proc.returncode}\n{log[-3000:]}", file=sys.stderr)

    for target in targets:  # --jobs at a time, each logging to WORK/TARGET.log
        while len(running) >= args.jobs:
            time.sleep(1.0)  # not os.wait(): it would take the exit status from Popen
            for item in [r for r in running if r[1].poll() is not None]:
                running.remove(item)
                finish(*item)
        with open(args.work / f"{target}.log", "wb") as log:
            running.append((target, subprocess.Popen(
                [sys.executable, __file__, "--target", target, "--seconds", str(args.seconds),
                 "--work", str(args.work)], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)})))
    for target, proc in running:
        proc.wait()
        finish(target, proc)
    print(f"{'target':<12} {'inputs':>10} {'crashes':>8}")
    for target in targets:
        print(f"{target:<12} {results[target][0]:>10} {results[target][1]:>8}")
    total = sum(int(n) for n, _ in results.values() if n.isdigit())
    failed = sum(c for _, c in results.values())
    print(f"{'total':<12} {total:>10} {failed:>8}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
