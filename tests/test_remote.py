"""The off-board planner (issue 14) on real sockets and real processes: keys, the wire's
hostile-input checks, the planner server's door (CURVE allow-list, plaintext, oversize),
replayed and forged plans, many robots with routing by identity and rate limits, batching
with a model exported with batch N (here and through a local Ray Serve), and the sim robot
solving episodes with its planner served from a second process.

The network faults (latency, stall, partition, server restart) are tests/test_remote_faults.py.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zmq
from onnx_bundle import JOINTS, make_bundle
from stack import REPO

from bench.remote_robots import (
    INSTRUCTION,
    Keys,
    PlannerServerProcess,
    SimulatedRobot,
    make_keys,
    remote_config,
)
from runtime.config import ConfigError, load_config
from runtime.deploy.preflight import remote_checks, remote_problems
from runtime.ipc import keys
from runtime.ipc.messages import Encoder, MessageError, decode, pack_array
from runtime.model.bundle import load_bundle
from runtime.model.plan import Plan
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PlannerPipeline, PlanRequest, state_times_ns
from runtime.remote import jpeg
from runtime.remote.wire import (
    Limits,
    bundle_id,
    decode_observation,
    encode_observation,
    encode_plan,
)

# This shared test host can starve the follower for whole ticks: these tests are about the
# network path, so a deadline-miss storm must be much worse than configs/sim.yaml's to FAULT.
STORM_MISSES = 400  # of follower.deadline_storm.window_ticks (500)
H = 10
RAMP = 0.03 * (np.arange(H) + 1)  # the tiny planner's base_yaw offsets (tests/onnx_bundle.py)
FRAME = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def remote_keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    return make_keys(tmp_path_factory.mktemp("keys"), [f"robot-{i}" for i in range(8)],
                     intruders=("intruder",))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, bundle: Path,
           remote_keys: Keys) -> Iterator[PlannerServerProcess]:
    srv = PlannerServerProcess(tmp_path_factory.mktemp("server"), bundle, remote_keys,
                               sets=["planner.serve.rate_hz=20",
                                     "planner.serve.max_frame_bytes=20000"])
    yield srv
    assert srv.stop() == 0


def _robot(server: PlannerServerProcess, remote_keys: Keys, bundle: Path, name: str,
           q: np.ndarray | None = None, frame: np.ndarray = FRAME) -> SimulatedRobot:
    return SimulatedRobot(remote_config(server.endpoint, remote_keys, name),
                          load_bundle(bundle), JOINTS, np.zeros(len(JOINTS)) if q is None else q,
                          frame)


def _plans(robot: SimulatedRobot, count: int, hz: float = 10.0, timeout_s: float = 10.0
           ) -> list[Any]:
    """Observe at `hz` until `count` plans came back (or the timeout)."""
    got: list[Any] = []
    start = time.monotonic()
    tick = 0
    while len(got) < count and time.monotonic() < start + timeout_s:
        robot.observe()
        tick += 1
        while time.monotonic() < start + tick / hz:
            got += robot.receive(10)
    return got


def _until(server: PlannerServerProcess, check: Any, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        tel = server.telemetry()
        if check(tel):
            return tel
    raise AssertionError(f"server telemetry never satisfied the check: {tel}")


# ------------------------------------------------------------------------ keys and config
@pytest.mark.system
def test_keys_generate_writes_a_private_secret_and_refuses_to_overwrite(tmp_path: Path) -> None:
    cli = [sys.executable, "-m", "runtime.cli", "keys", "generate", "robot-7", "--out",
           str(tmp_path)]
    assert subprocess.run(cli, cwd=REPO, capture_output=True).returncode == 0
    public, secret = tmp_path / "robot-7.key", tmp_path / "robot-7.key_secret"
    assert public.stat().st_mode & 0o777 == 0o644
    assert secret.stat().st_mode & 0o777 == 0o600
    pair = keys.load_pair(secret)
    assert keys.load_public(public) == pair.public and b"secret-key" not in public.read_bytes()
    again = subprocess.run(cli, cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 1 and "refusing to replace" in again.stderr
    assert keys.load_allow_list(tmp_path) == {pair.public: "robot-7"}

    secret.chmod(0o644)
    with pytest.raises(keys.KeyFileError, match=r"robot-7.key_secret: mode 0644 .* chmod 600"):
        keys.load_pair(secret)
    only_public = tmp_path / "only-public.key_secret"
    only_public.write_bytes(public.read_bytes())
    only_public.chmod(0o600)
    with pytest.raises(keys.KeyFileError, match="holds no secret-key"):
        keys.load_pair(only_public)
    other_public, other_secret = keys.generate("other", tmp_path)
    mixed = tmp_path / "mixed.key_secret"
    mixed.write_text(other_secret.read_text().replace(
        keys.load_public(other_public).decode(), pair.public.decode()))
    mixed.chmod(0o600)
    with pytest.raises(keys.KeyFileError, match="does not belong to the secret key"):
        keys.load_pair(mixed)


def test_remote_config_needs_keys_unless_insecure(tmp_path: Path) -> None:
    base = REPO / "configs/sim.yaml"
    with pytest.raises(ConfigError, match=r"planner.remote: .*insecure: true"):
        load_config(base, None, ["planner.remote.endpoint=tcp://10.0.0.2:5571"])
    with pytest.raises(ConfigError, match=r"planner.remote.endpoint"):
        load_config(base, None, ["planner.remote.endpoint=http://x", "planner.remote.insecure=1"])
    with pytest.raises(ConfigError, match=r"planner.serve: .*insecure: true"):
        load_config(base, None, ["planner.serve.listen=tcp://0.0.0.0:5571"])
    cfg = load_config(base, None, ["planner.remote.endpoint=tcp://10.0.0.2:5571",
                                   "planner.remote.insecure=true"])
    assert cfg.planner.remote is not None and cfg.planner.remote.insecure
    assert [c[0] for c in remote_checks(cfg)] == ["warn"]  # `duet doctor` flags plaintext
    assert "insecure: true" in remote_checks(cfg)[0][1] and remote_problems(cfg) == []


def test_preflight_checks_the_key_files(tmp_path: Path, remote_keys: Keys) -> None:
    base = REPO / "configs/sim.yaml"
    sets = ["planner.remote.endpoint=tcp://10.0.0.2:5571",
            f"planner.remote.server_key={remote_keys.server_public}",
            f"planner.remote.robot_key={remote_keys.robots['robot-0']}",
            f"planner.serve.key={remote_keys.server_secret}",
            f"planner.serve.allow={remote_keys.allow}"]
    cfg = load_config(base, None, sets)
    checks = remote_checks(cfg)
    assert [c[0] for c in checks] == ["ok"] * 4, checks
    assert "8 robot key(s)" in checks[0][1]
    loose = tmp_path / "loose.key_secret"
    loose.write_bytes(remote_keys.robots["robot-0"].read_bytes())
    loose.chmod(0o640)
    cfg = load_config(base, None, [*sets[:2], f"planner.remote.robot_key={loose}"])
    assert remote_problems(cfg) == [f"planner.remote.robot_key: {loose}: mode 0640 lets "
                                    f"others read the secret key; chmod 600 {loose}"]


# ------------------------------------------------------------------------ the wire
def _observation_body(bundle: Path, frames: dict[str, bytes] | None = None,
                      **over: Any) -> tuple[bytes, StateHistory, int]:
    b = load_bundle(bundle)
    h = StateHistory(6)
    for k in range(5):
        h.add(1_000_000_000 + k * 2_000_000, q=np.full(6, 0.1 * k), dq=np.zeros(6))
    t = h.latest_t_ns
    args: dict[str, Any] = {
        "bundle": bundle_id(b), "t_obs_ns": t, "states": h.rows_at(state_times_ns(b.contract, t)),
        "jpegs": frames if frames is not None else {"scene": jpeg.encode(FRAME, 90)},
        "instruction": INSTRUCTION, "episode": 3, "previous": None, "previous_waypoints": None,
        "expected_s": 0.05}
    args.update(over)
    return encode_observation(Encoder(), **args), h, t


LIMITS = Limits(6, frozenset({"scene"}), 20_000, 640 * 480)


def test_an_observation_carries_what_the_contract_reads_and_decodes_to_the_same_plan(
        bundle: Path) -> None:
    body, h, t = _observation_body(bundle)
    prev = np.tile(np.linspace(0, 0.2, 6, dtype=np.float32), (H, 1))
    plan = Plan(prev, 0.1, (t - 50_000_000) / 1e9, t / 1e9)
    with_prefix, _, _ = _observation_body(bundle, previous=plan, previous_waypoints=prev)
    got = decode_observation(body, LIMITS)
    assert got.bundle == bundle_id(load_bundle(bundle)) and got.episode == 3
    assert got.request.obs.t_obs_ns == t and got.request.obs.history.count == 1  # only t_obs
    np.testing.assert_array_equal(got.request.obs.history.at("q", t), h.at("q", t))
    assert np.abs(got.request.obs.frames["scene"].astype(int) - FRAME).mean() < 8  # JPEG 90
    assert decode_observation(with_prefix, LIMITS).request.previous is not None
    # the server's pipeline plans from the decoded observation what the robot's would
    pipe = PlannerPipeline(load_bundle(bundle), JOINTS)
    remote = pipe.plan_batch([got.request])[0].copy()
    pipe.set_instruction(INSTRUCTION)
    local = pipe.plan(Observation({"scene": FRAME}, h, t))
    np.testing.assert_array_equal(remote, local)
    np.testing.assert_allclose(local[:, 0], h.at("q", t)[0] + RAMP, atol=1e-6)


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A real JPEG whose frame header (SOF0) claims other dimensions: a decompression bomb."""
    data = bytearray(jpeg.encode(FRAME[:8, :8], 90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


def test_hostile_observations_are_refused_by_reason(bundle: Path) -> None:
    noise = np.random.default_rng(1).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    cases: dict[str, bytes] = {
        "oversize": _observation_body(bundle, {"scene": jpeg.encode(noise, 95)})[0],
        "oversize ": _observation_body(bundle, {"scene": _jpeg_claiming(60000, 60000)})[0],
        "frame": _observation_body(bundle, {"scene": b"\xff\xd8 not a jpeg"})[0],
        "frames": _observation_body(bundle, {"scene": b"", "wrist": b""})[0],
        "frames ": _observation_body(bundle, {})[0],
        "schema": _observation_body(bundle, instruction="x" * 5000)[0],
        "schema ": _observation_body(bundle, expected_s=float("inf"))[0],
        "time": _observation_body(bundle, t_obs_ns=5)[0],
    }
    # hand-made: a non-finite state, a state history far too long, a bad prefix
    body, _, t = _observation_body(bundle)
    msg = decode(body)
    bad = dict(msg, state=pack_array(np.full((4, 1, 6), np.nan)))
    cases["nonfinite"] = Encoder().encode("observation", bad)
    long = dict(msg, state_t_ns=pack_array(np.arange(1000, dtype="<i8")),
                state=pack_array(np.zeros((4, 1000, 6))))
    cases["shape"] = Encoder().encode("observation", long)
    prefix = dict(msg, prefix={"waypoints": pack_array(np.zeros((1, 6), np.float32)),
                               "dt_s": 0.1, "t_obs_ns": t})
    cases["shape "] = Encoder().encode("observation", prefix)
    cases["malformed"] = b"\xc1" * 64
    for kind, frame in cases.items():
        with pytest.raises(MessageError) as err:
            decode_observation(frame, LIMITS)
        assert err.value.kind == kind.strip(), (kind, err.value)


# ------------------------------------------------------------------------ the server's door
@pytest.mark.system
def test_only_admitted_keys_get_plans_and_refusals_are_counted(
        server: PlannerServerProcess, remote_keys: Keys, bundle: Path, tmp_path: Path) -> None:
    q = np.array([0.1, -0.2, 0.3, -0.4, 0.5, 0.2])
    robot = _robot(server, remote_keys, bundle, "robot-0", q)
    try:
        plans = _plans(robot, 3)
        assert len(plans) == 3
        w = np.asarray(plans[-1].waypoints)
        np.testing.assert_allclose(w[:, 0], q[0] + RAMP, atol=1e-5)
        np.testing.assert_allclose(w[:, 1:], np.tile(q[1:], (H, 1)), atol=1e-5)
        assert robot.link.connected and robot.link.round_trip.count == 3
    finally:
        robot.close()

    before = server.telemetry()
    intruder = _robot(server, remote_keys, bundle, "intruder")
    # a client that does not speak CURVE, and one that pins the wrong server key
    plaintext = SimulatedRobot(remote_config(server.endpoint, None, ""), load_bundle(bundle),
                               JOINTS, np.zeros(6), FRAME)
    wrong_server = make_keys(tmp_path, ["robot-0"])
    impostor_key = SimulatedRobot(remote_config(server.endpoint, wrong_server, "robot-0"),
                                  load_bundle(bundle), JOINTS, np.zeros(6), FRAME)
    try:
        for r in (intruder, plaintext, impostor_key):
            assert _plans(r, 1, timeout_s=3.0) == []
        tel = _until(server, lambda t: t["refused_connections"].get("remote unknown key", 0)
                     > before["refused_connections"].get("remote unknown key", 0)
                     and sum(t["handshakes"].get(k, 0) for k in ("protocol", "no_detail"))
                     >= sum(before["handshakes"].get(k, 0) for k in ("protocol", "no_detail"))
                     + 2)
        assert "intruder" not in tel["robots"]
        assert intruder.link.dropped["handshake"] >= 1  # the robot's side sees it too
    finally:
        for r in (intruder, plaintext, impostor_key):
            r.close()


@pytest.mark.system
def test_oversize_frames_and_messages_are_refused_and_the_server_goes_on(
        server: PlannerServerProcess, remote_keys: Keys, bundle: Path) -> None:
    noise = np.random.default_rng(2).integers(0, 256, (160, 160, 3), dtype=np.uint8)
    big = _robot(server, remote_keys, bundle, "robot-1", frame=noise)
    assert len(big.jpegs["scene"]) > 20_000  # over the server's planner.serve.max_frame_bytes
    try:
        assert _plans(big, 1, timeout_s=3.0) == []
        assert big.link.refused["oversize"] >= 1
        # a message past the socket's cap drops the connection, not the server
        big.link.sock.send(b"\x00" * (4 << 20))
        _until(server, lambda t: t["disconnects"] >= 1)
        big.jpegs = {"scene": jpeg.encode(FRAME, 90)}
        assert len(_plans(big, 2)) == 2  # the same robot, redialled by libzmq
        tel = server.telemetry()
        assert tel["robots"]["robot-1"]["refused"]["oversize"] >= 1
    finally:
        big.close()


@pytest.mark.system
def test_a_robot_on_another_bundle_is_refused(server: PlannerServerProcess,
                                               remote_keys: Keys, bundle: Path) -> None:
    robot = _robot(server, remote_keys, bundle, "robot-2")
    try:
        assert _send_when_connected(robot, bundle="20250101-000000-fp32-00000000:deadbeef")
        assert robot.receive(3000) == [] and robot.link.refused["bundle"] == 1
    finally:
        robot.close()


def test_replayed_forged_and_unknown_plans_are_refused_by_the_robot(
        bundle: Path, remote_keys: Keys) -> None:
    """A server that answers wrongly (compromised, or crossed wires): the robot's link takes
    a plan only for an observation it sent, with that observation's t_obs, newer than the
    last; the follower core would refuse an old one again."""
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    pair = keys.load_pair(remote_keys.server_secret)
    fake.curve_server, fake.curve_secretkey, fake.curve_publickey = True, pair.secret, pair.public
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    robot = SimulatedRobot(remote_config(f"tcp://127.0.0.1:{port}", remote_keys, "robot-3"),
                           load_bundle(bundle), JOINTS, np.zeros(6), FRAME)
    enc = Encoder()
    try:
        seen = []
        for _ in range(2):
            assert _send_when_connected(robot)
            assert fake.poll(5000)
            route, body = fake.recv_multipart()
            seen.append(decode(body))
        first, second = seen
        w = np.zeros((H, 6), np.float32)

        def answer(obs: dict[str, Any], t_obs: int | None = None, seq: int | None = None
                   ) -> None:
            fake.send_multipart([route, encode_plan(
                enc, w, 0.1, obs["t_obs_ns"] if t_obs is None else t_obs, None,
                obs["seq"] if seq is None else seq, 1.0)])

        answer(second)  # taken
        answer(first)  # older than the one taken: a replay
        answer(second)  # the same again: a replay
        answer(second, t_obs=second["t_obs_ns"] + 10**8)  # a t_obs this robot never sent
        answer(second, seq=9999)  # an observation this robot never sent
        got: list[Any] = []
        wrong = ("replay", "forged", "unknown")
        deadline = time.monotonic() + 5.0
        while sum(robot.link.dropped[k] for k in wrong) < 4 and time.monotonic() < deadline:
            got += robot.receive(100)
        assert [a.sent.t_obs_ns for a in got] == [second["t_obs_ns"]]
        assert {k: robot.link.dropped[k] for k in wrong} == {"replay": 2, "forged": 1,
                                                              "unknown": 1}
    finally:
        robot.close()
        fake.close()


class Recorder:
    """A TCP forwarder on the loopback that keeps every byte the client sent."""

    def __init__(self, upstream: str) -> None:
        host, port = upstream.removeprefix("tcp://").rsplit(":", 1)
        self.upstream = (host, int(port))
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sent = bytearray()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        down, _ = self.listener.accept()
        up = socket.create_connection(self.upstream)
        pairs = {down: up, up: down}
        while True:
            ready, _, _ = select.select(list(pairs), [], [], 5.0)
            for sock in ready:
                data = sock.recv(65536)
                if not data:
                    down.close()
                    up.close()
                    return
                if sock is down:
                    self.sent += data
                pairs[sock].sendall(data)


@pytest.mark.system
def test_a_recorded_session_replayed_to_the_server_is_refused(
        server: PlannerServerProcess, remote_keys: Keys, bundle: Path) -> None:
    """Someone on the path records a robot's encrypted session and plays it back: CURVE's
    per-connection keys make the server refuse the handshake; nothing in it is planned."""
    rec = Recorder(server.endpoint)
    robot = SimulatedRobot(remote_config(rec.endpoint, remote_keys, "robot-4"),
                           load_bundle(bundle), JOINTS, np.zeros(6), FRAME)
    try:
        assert len(_plans(robot, 3)) == 3
    finally:
        robot.close()
    time.sleep(0.5)
    before = server.telemetry()
    seen = before["robots"]["robot-4"]["observations"]
    with socket.create_connection(rec.upstream) as replay:
        replay.sendall(bytes(rec.sent))
        replay.settimeout(2.0)
        with contextlib.suppress(OSError):
            while replay.recv(65536):
                pass  # the server answers the greeting, then drops the connection
    failed = ("protocol", "no_detail", "auth")
    tel = _until(server, lambda t: sum(t["handshakes"].get(k, 0) for k in failed)
                 > sum(before["handshakes"].get(k, 0) for k in failed))
    assert tel["robots"]["robot-4"]["observations"] == seen


def _send_when_connected(robot: SimulatedRobot, timeout_s: float = 5.0,
                         bundle: str | None = None) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if robot.observe(bundle):
            return True
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------------ many robots
@pytest.mark.system
def test_eight_robots_get_their_own_plans_and_a_vanished_one_stalls_no_one(
        server: PlannerServerProcess, remote_keys: Keys, bundle: Path) -> None:
    robots = [_robot(server, remote_keys, bundle, f"robot-{i}",
                     np.array([0.05 * i, 0.1, -0.1 * i, 0.0, 0.2, 0.01 * i]))
              for i in range(8)]
    vanished: list[SimulatedRobot] = []
    try:
        for r in robots:
            assert _send_when_connected(r)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 6.0:
            if time.monotonic() - t0 > 2.0 and not vanished:
                vanished.append(robots[7])
                robots[7].observe()
                robots[7].close()  # vanishes mid-stream, its last observation in flight
            for r in robots[:6]:
                r.observe()
            # robot 6 keeps sending but never reads: its plans pile up in its queue and
            # the server's, then its own heartbeats time out (and it redials)
            with contextlib.suppress(zmq.Again):
                robots[6].link.sock.send(_resend(robots[6]), zmq.NOBLOCK)
            for r in robots[:6]:
                r.receive()
            time.sleep(0.1)  # 10 Hz each, half the server's per-robot rate
        time.sleep(0.3)
        for i, r in enumerate(robots[:6]):
            r.receive()
            sent = r.link.enc.seq
            assert sent >= 30 and len(r.answers) >= 0.9 * sent, (i, sent, len(r.answers))
            for a in r.answers:  # every plan is this robot's own: q + the ramp
                np.testing.assert_allclose(a.waypoints[:, 0], r.q[0] + RAMP, atol=1e-5)
                np.testing.assert_allclose(a.waypoints[:, 2], r.q[2], atol=1e-5)
        tel = server.telemetry()
        assert tel["robots"]["robot-6"]["plans"] > 0
    finally:
        for r in robots:
            if r not in vanished:
                r.close()


def _resend(robot: SimulatedRobot) -> bytes:
    t = time.monotonic_ns()
    robot.history.add(t, q=robot.q, dq=np.zeros(6))
    return encode_observation(
        robot.link.enc, bundle=robot.bundle, t_obs_ns=t,
        states=robot.history.rows_at([t]), jpegs=robot.jpegs, instruction=INSTRUCTION,
        episode=None, previous=None, previous_waypoints=None, expected_s=0.0)


@pytest.mark.system
def test_a_robot_flooding_the_server_is_held_to_its_rate(
        server: PlannerServerProcess, remote_keys: Keys, bundle: Path) -> None:
    robot = _robot(server, remote_keys, bundle, "robot-5")
    try:
        assert _send_when_connected(robot)
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            robot.observe()
            robot.receive(5)  # ~150 observations/s against planner.serve.rate_hz = 20
        robot.receive(300)
        # 20/s for 3 s, and the bucket's half second of burst
        assert 30 <= len(robot.answers) <= 3.0 * 20 + 10 + 2, len(robot.answers)
        assert robot.link.refused["rate"] >= 1  # told (at most once a second)
    finally:
        robot.close()


# ------------------------------------------------------------------------ batching
BATCH = 4


@pytest.fixture(scope="module")
def batch_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A planner exported with batch 4 through the public export API, with a static and
    with a dynamic batch: waypoints = each row's own q + a ramp on its first joint, so rows
    cannot be mixed up unseen."""
    import torch
    from torch import nn

    from runtime.model.tokenizer import Tokenizer

    class RowPlanner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            ramp = torch.zeros(H, 6)
            ramp[:, 0] = torch.tensor(RAMP, dtype=torch.float32)
            self.register_buffer("ramp", ramp)

        def forward(self, image: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor
                    ) -> torch.Tensor:
            seen = 0.0 * (image.float().mean(dim=(1, 2, 3)) + tokens.float().mean(dim=1))
            return q[:, None, :] + self.ramp[None] + seen[:, None, None]

    root = tmp_path_factory.mktemp("batch")
    Tokenizer().save(root / "tokenizer.json")
    return {kind: _export_rows(root, RowPlanner().eval(), kind == "dynamic")
            for kind in ("static", "dynamic")}


def _export_rows(root: Path, module: Any, dynamic: bool) -> Path:
    from export.pipeline import ExportOptions, export_bundle, load_contract

    contract = {
        "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
        "planner": {"batch": BATCH, "dynamic_batch": dynamic,
                    "stages": [{"name": "planner", "file": "planner.onnx",
                    "inputs": [
                        {"role": "camera", "name": "image", "camera": "scene", "height": 96,
                         "width": 96},
                        {"role": "instruction", "name": "tokens", "tokenizer": "tokenizer.json",
                         "max_len": 16},
                        {"role": "proprio", "name": "q"}],
                    "outputs": [{"role": "actions", "name": "waypoints"}]}],
                    "actions": {"horizon": H, "dt_s": 0.1, "joints": JOINTS}}}
    name = "dynamic" if dynamic else "static"
    (root / f"{name}.yaml").write_text(yaml.safe_dump(contract))
    with contextlib.redirect_stdout(io.StringIO()):
        return export_bundle(load_contract(root / f"{name}.yaml"), {"planner": module},
                             root / name, ExportOptions(calib=8, parity_samples=5), root)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["static", "dynamic"])
def test_a_batch_n_model_plans_n_observations_in_one_call_row_by_row(
        kind: str, batch_bundles: dict[str, Path]) -> None:
    b = load_bundle(batch_bundles[kind])
    assert b.contract.planner.batch == BATCH
    spec = b.stage_spec(b.contract.planner.stages[0])
    assert all(t.shape[0] == BATCH for t in spec.inputs + spec.outputs)
    pipe = PlannerPipeline(b, JOINTS)
    out_buf = pipe.stages[0].engine.run(pipe.stages[0].feeds)["waypoints"]
    out_buf[3] = 123.0  # a sentinel in the row no observation fills
    requests, qs = [], []
    for i in range(3):  # fewer than the batch: the spare row repeats a real one
        h = StateHistory(6)
        q = np.linspace(-0.3, 0.3, 6) * (i + 1)
        h.add(10**9, q=q, dq=np.zeros(6))
        qs.append(q)
        requests.append(PlanRequest(Observation({"scene": FRAME}, h, 10**9, INSTRUCTION)))
    bad = PlanRequest(Observation({}, requests[0].obs.history, 10**9, INSTRUCTION))
    calls = pipe.stages[0].ms.count
    out = pipe.plan_batch([requests[0], bad, requests[1], requests[2]])
    assert pipe.stages[0].ms.count == calls + 1  # one engine call for all of them
    assert isinstance(out[1], Exception) and "no frame from camera scene" in str(out[1])
    for w, q in zip([out[0], out[2], out[3]], qs, strict=True):
        assert isinstance(w, np.ndarray)
        np.testing.assert_allclose(w[:, 0], q[0] + RAMP, atol=1e-5)
        np.testing.assert_allclose(w[:, 1:], np.tile(q[1:], (H, 1)), atol=1e-5)
    # a static batch computes every row (the spare one repeats a real observation); a
    # dynamic one computes the three that were filled, nothing more
    assert (out_buf[3] == 123.0).all() == (kind == "dynamic")
    with pytest.raises(ValueError, match="5 observations for a batch of 4"):
        pipe.plan_batch(requests + requests[:2])


def _batched_robots(server: PlannerServerProcess, k: Keys, bundle: Path, n: int
                    ) -> list[SimulatedRobot]:
    robots = [SimulatedRobot(remote_config(server.endpoint, k, f"robot-{i}"), load_bundle(bundle),
                             JOINTS, np.full(6, 0.05 * i), FRAME) for i in range(n)]
    for r in robots:
        assert _send_when_connected(r, 30.0)
    return robots


@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize(("engine", "kind"), [("local", "static"), ("local", "dynamic"),
                                             ("ray", "dynamic")])
def test_the_server_batches_robots_into_one_engine_call(
        engine: str, kind: str, batch_bundles: dict[str, Path], remote_keys: Keys,
        tmp_path: Path) -> None:
    """Four robots observing together share engine calls, on this host's engine and through
    a Ray Serve deployment (`@serve.batch`) on a local Ray instance; each gets its own plan."""
    batch_bundle = batch_bundles[kind]
    if engine == "ray":
        pytest.importorskip("ray.serve", reason="the `serve` extra (Ray Serve)")
    sets = ["planner.serve.engine=" + engine, "planner.serve.ray.replicas=1",
            "planner.serve.ray.batch_wait_ms=20", "planner.serve.ray.cpus_per_replica=0.5"]
    env_prefix = ["env", "RAY_DEDUP_LOGS=0", "RAY_USAGE_STATS_ENABLED=0"]
    server = PlannerServerProcess(tmp_path, batch_bundle, remote_keys, sets=sets,
                                  prefix=env_prefix, start_timeout_s=180)  # Ray: ~30 s
    robots: list[SimulatedRobot] = []
    try:
        robots = _batched_robots(server, remote_keys, batch_bundle, BATCH)
        for _ in range(15):
            for r in robots:
                r.observe()
            for r in robots:
                r.receive(2000)
            time.sleep(0.1)
        for r in robots:
            assert len(r.answers) >= 12, len(r.answers)
            for a in r.answers:
                np.testing.assert_allclose(a.waypoints[:, 1:], np.tile(r.q[1:], (H, 1)),
                                           atol=1e-5)
        tel = server.telemetry()
        assert tel["batch"] == BATCH and tel["batch_size"]["max"] > 1, tel["batch_size"]
    finally:
        for r in robots:
            r.close()
        assert server.stop() == 0


# ------------------------------------------------------------------------ the sim robot
@pytest.mark.system
def test_the_sim_robot_solves_episodes_with_its_planner_served_over_curve(
        tmp_path: Path, remote_keys: Keys) -> None:
    """What `make demo-remote` runs: the shipped bundle, planned by a second process over
    CURVE TCP; the follower tracks and the summary reports the round trip."""
    server = PlannerServerProcess(tmp_path / "server", REPO / "bundles/reference", remote_keys)
    out = tmp_path / "summary.json"
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "run", "--config",
             str(REPO / "configs/sim.yaml"), "--set", f"run_dir={tmp_path / 'run'}",
             "--set", f"planner.remote.endpoint={server.endpoint}",
             "--set", f"planner.remote.server_key={remote_keys.server_public}",
             "--set", f"planner.remote.robot_key={remote_keys.robots['robot-0']}",
             "--set", f"follower.deadline_storm.misses={STORM_MISSES}",
             "--duration", "12", "--summary-json", str(out)],
            cwd=REPO, capture_output=True, text=True, timeout=120,
            env={**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")})
        tel = server.telemetry()
    finally:
        server.stop()
    s = json.loads(out.read_text())
    assert proc.returncode == 0, proc.stderr[-3000:]
    remote = s["planner"]["remote"]
    assert remote["round_trip_ms"]["p50"] > 0, (s["planner"], proc.stderr[-3000:])
    assert remote["endpoint"] == server.endpoint and remote["secure"] is True
    assert 0 < remote["round_trip_ms"]["p50"] <= remote["round_trip_ms"]["p99"]
    assert s["planner"]["plans"] > 20 and s["follower"]["mode_counts"]["TRACK"] > 0
    assert s["task"]["successes"] >= 1, s["task"]
    assert tel["robots"]["robot-0"]["plans"] >= s["planner"]["plans"] - 2
