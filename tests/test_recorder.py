"""Flight recorder against a real publisher process over real ipc sockets."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from runtime import endpoints
from runtime.deploy.mcap_sink import read_recording
from runtime.deploy.recorder import Recorder
from runtime.rpc import RequestError, request_at

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = Path(__file__).with_name("test_deploy_publisher.py")


def _publisher(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(PUBLISHER), str(run_dir), *extra],
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline() == b"publishing\n"
    return proc


@pytest.fixture
def run_dir(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "run"
    yield path


def _wait_for(path: Path, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_sigkill_leaves_complete_chunks(run_dir: Path, tmp_path: Path) -> None:
    pub = _publisher(run_dir, "--duration", "30")
    rec = subprocess.Popen([sys.executable, "-m", "runtime.cli", "record", "serve",
                            "--config", str(REPO / "configs/sim.yaml"), "--run-dir",
                            str(run_dir), "--dir", str(tmp_path / "rec")], cwd=REPO)
    try:
        _wait_for(run_dir / "recorder")
        reply = request_at(endpoints.recorder(str(run_dir)), "start", {"name": "ep1"}, 10.0)
        assert reply["ok"], reply
        time.sleep(2.6)  # two 1-second chunks flushed, a third in progress
        rec.send_signal(signal.SIGKILL)
        rec.wait(timeout=10)
    finally:
        for proc in (rec, pub):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    contents = read_recording(tmp_path / "rec/episodes/ep1.mcap")
    assert not contents.complete and contents.error  # really cut off: no footer
    by_topic: dict[str, list[bytes]] = {}
    for topic, _schema, _t, data in contents.messages:
        by_topic.setdefault(topic, []).append(data)
    # publisher state at 200 Hz: at least the first full second survived
    assert len(by_topic["/follower/state"]) >= 150
    state = json.loads(by_topic["/follower/state"][-1])
    assert len(state["q"]) == 6 and state["mode"] == "TRACK"
    telemetry = json.loads(by_topic["/follower/telemetry"][0])
    assert telemetry["period_jitter_us"]["p99"] == 87.25
    plan = json.loads(by_topic["/planner/plan"][0])
    assert len(plan["waypoints"]) == 10 and len(plan["waypoints"][0]) == 6
    frame = json.loads(by_topic["/sim/frame"][0])
    assert frame["encoding"] == "rgb8"
    assert len(base64.b64decode(frame["data"])) == 96 * 96 * 3
    schemas = {schema for topic, schema, *_ in contents.messages}
    assert {"duet.State", "foxglove.RawImage"} <= schemas


def test_fault_dumps_the_ring_and_a_clean_close_is_complete(run_dir: Path, tmp_path: Path
                                                            ) -> None:
    out = tmp_path / "rec"
    rec = Recorder(str(run_dir), out, ring_s=1.0, budget_mb=100.0, metadata={"robot": "t"},
                   frame_hz=0.0, post_s=0.5)
    pub = _publisher(run_dir, "--fault-after", "2.0", "--duration", "10")
    try:
        end = time.monotonic() + 8.0
        while time.monotonic() < end and not (rec.stats.incidents and rec.incident is None):
            rec.poll_once(50)
    finally:
        pub.kill()
        pub.wait()
        rec.close()
    files = list((out / "incidents").glob("*-FAULT.mcap"))
    assert len(files) == 1, files
    contents = read_recording(files[0])
    assert contents.complete and contents.error is None
    modes = [json.loads(d)["mode"] for topic, _, _, d in contents.messages
             if topic == "/follower/state"]
    first_fault = modes.index("FAULT")
    # ~1 s of ring before the fault (200 Hz) and the post-fault window after it
    assert 120 <= first_fault <= 260 and modes[-1] == "FAULT"
    assert len(modes) - first_fault >= 50
    assert rec.stats.incidents == 1  # staying in FAULT is one incident, not one per sample


def test_episode_control_errors(run_dir: Path, tmp_path: Path) -> None:
    rec = Recorder(str(run_dir), tmp_path / "rec", 1.0, 100.0, {})
    try:
        with pytest.raises(RequestError, match="episode name"):
            rec.start_episode("../etc/passwd")
        with pytest.raises(RequestError, match="no episode"):
            rec.stop_episode()
        rec.start_episode("a")
        with pytest.raises(RequestError, match="is recording"):
            rec.start_episode("b")
        assert rec.stop_episode()["messages"] == 0
        with pytest.raises(RequestError, match="exists"):
            rec.start_episode("a")
    finally:
        rec.close()


def test_budget_deletes_oldest_segments_then_incidents_never_episodes(
        run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "rec"
    sizes = {"continuous/old.mcap": 400_000, "continuous/new.mcap": 400_000,
             "incidents/i1.mcap": 400_000, "episodes/keep.mcap": 600_000}
    for i, (rel, size) in enumerate(sizes.items()):
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\0" * size)
        os.utime(path, (1_000_000 + i, 1_000_000 + i))  # oldest first, in dict order
    rec = Recorder(str(run_dir), out, ring_s=1.0, budget_mb=1.0, metadata={})
    try:
        rec.enforce_budget()  # 1.8 MB of files, budget 1 MiB
    finally:
        rec.close()
    left = sorted(str(p.relative_to(out)) for p in out.rglob("*.mcap"))
    assert left == ["episodes/keep.mcap", "incidents/i1.mcap"]
    assert rec.stats.deleted_files == 2


def test_hostile_requests_and_messages_never_stop_the_recorder(run_dir: Path,
                                                               tmp_path: Path) -> None:
    """Non-dict args (which killed it), an unhashable type, and a zero-size array with huge
    dimensions on a data socket (which sent it out of memory in `.tolist()`)."""
    import msgpack
    import zmq

    from runtime.messages import Encoder

    rec = subprocess.Popen([sys.executable, "-m", "runtime.cli", "record", "serve",
                            "--config", str(REPO / "configs/sim.yaml"), "--run-dir",
                            str(run_dir), "--dir", str(tmp_path / "rec")], cwd=REPO)
    ctx = zmq.Context.instance()
    pub = ctx.socket(zmq.PUB)
    try:
        _wait_for(run_dir / "recorder")
        pub.bind(endpoints.telemetry(str(run_dir), "follower"))
        enc = Encoder()
        bomb = {"dtype": "<f4", "shape": [2**20, 2**20, 0], "data": b""}
        for _ in range(20):  # PUB/SUB joins asynchronously: repeat
            pub.send(enc.encode("telemetry", {"mode": "TRACK", "q": bomb}))
            time.sleep(0.02)
        sock = ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(endpoints.recorder(str(run_dir)))
        for body in (enc.encode("request", {"cmd": "start", "args": [1]}),
                     msgpack.packb({"v": 1, "type": [], "seq": 1, "t_ns": 1})):
            sock.send(body)
            assert sock.poll(5000)
            sock.recv()
        sock.close()
        status = request_at(endpoints.recorder(str(run_dir)), "status", {}, 5.0)
        # recorded, with the bomb array as null (its 2**40 empty lists never built)
        assert status["ok"] and status["result"]["ring_messages"] >= 1, status
        assert rec.poll() is None
    finally:
        pub.close(linger=0)
        if rec.poll() is None:
            rec.terminate()
            rec.wait(timeout=10)
