"""Flight recorder against a real publisher process over real ipc sockets."""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sim_arm import JOINTS, N_JOINTS

from runtime.ipc import endpoints
from runtime.ipc.rpc import RequestError, request_at
from runtime.observe.mcap_sink import read_recording
from runtime.observe.recorder import Recorder

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


@pytest.mark.system
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
    assert telemetry["period_jitter_us"]["max"] == 50.0  # the publisher's loop: 2050 - 2000 µs
    plan = json.loads(by_topic["/planner/plan"][0])
    assert len(plan["waypoints"]) == 10 and len(plan["waypoints"][0]) == 6
    frame = json.loads(by_topic["/sim/frame"][0])
    assert frame["encoding"] == "rgb8"
    assert len(base64.b64decode(frame["data"])) == 96 * 96 * 3
    schemas = {schema for topic, schema, *_ in contents.messages}
    assert {"duet.State", "foxglove.RawImage"} <= schemas


@pytest.mark.system
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


@pytest.mark.system
def test_hostile_requests_and_messages_never_stop_the_recorder(run_dir: Path,
                                                               tmp_path: Path) -> None:
    """Non-dict args (which killed it), an unhashable type, and a zero-size array with huge
    dimensions on a data socket (which sent it out of memory in `.tolist()`)."""
    import msgpack
    import zmq

    from runtime.ipc.messages import Encoder

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


def _channels(contents: object) -> dict[str, list[dict[str, object]]]:
    out: dict[str, list[dict[str, object]]] = {}
    for topic, _schema, _t, data in contents.messages:  # type: ignore[attr-defined]
        out.setdefault(topic, []).append(json.loads(data))
    return out


@pytest.mark.system
def test_episode_is_labelled_for_people(run_dir: Path, tmp_path: Path) -> None:
    """Wall-clock stamps with the monotonic kept, joint names and units in the schemas, the
    instruction, the sim's outcome, bundle version and config hash in the metadata; nothing
    the publisher sends is rejected; the operator's outcome wins over the sim's."""
    from runtime.config import load_config
    from runtime.observe.recorder import recording_metadata

    cfg = load_config(REPO / "configs/sim.yaml", None, [f"run_dir={run_dir}"])
    meta = recording_metadata(cfg, "configs/sim.yaml")
    rec = Recorder(str(run_dir), tmp_path / "rec", 1.0, 100.0, meta, frame_hz=0.0,
                   joints=list(cfg.robot.joints))
    pub = _publisher(run_dir, "--duration", "20")
    try:
        end = time.monotonic() + 10
        while rec.instruction is None and time.monotonic() < end:
            rec.poll_once(50)
        before_ns = time.time_ns()
        rec.start_episode("ep-sim")
        end = time.monotonic() + 10
        while not rec.episode_results and time.monotonic() < end:
            rec.poll_once(50)
        sim_stop = rec.stop_episode()
        rec.start_episode("ep-operator")
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            rec.poll_once(50)
        operator_stop = rec.stop_episode(False)
        status = rec.status()
    finally:
        pub.kill()
        pub.wait()
        rec.close()
    assert sim_stop["outcome"] == "success" and sim_stop["outcome_source"] == "sim"
    assert operator_stop["outcome"] == "fail" and operator_stop["outcome_source"] == "operator"
    assert status["rejected"] == {}, status  # sim tasks and results are channels, not noise
    contents = read_recording(Path(sim_stop["path"]))
    assert contents.complete
    duet, outcome = contents.metadata["duet"], contents.metadata["duet.outcome"]
    assert duet["instruction"] == "put the red cube in the bin"  # what the planner works on
    assert duet["bundle_version"] == json.loads(
        (REPO / "bundles/reference/manifest.json").read_text())["version"]
    assert len(duet["config_hash"]) == 16 and duet["joints"] == ",".join(JOINTS)
    assert outcome["outcome"] == "success" and outcome["source"] == "sim"
    channels = _channels(contents)
    assert {"/follower/state", "/sim/episode", "/sim/task"} <= set(channels)
    state = channels["/follower/state"][-1]
    wall = state["timestamp"]["sec"] * 10**9 + state["timestamp"]["nsec"]  # type: ignore[index]
    assert before_ns - 2e9 < wall < time.time_ns()  # wall clock, not monotonic
    assert abs(state["t_mono_ns"] - time.monotonic_ns()) < 60e9  # type: ignore[operator]
    log_times = [t for topic, _, t, _ in contents.messages if topic == "/follower/state"]
    assert before_ns - 2e9 < log_times[0] < time.time_ns()
    from mcap.reader import make_reader

    with open(sim_stop["path"], "rb") as f:
        summary = make_reader(f).get_summary()
    assert summary is not None
    state_schema = next(s for s in summary.schemas.values() if s.name == "duet.State")
    q = json.loads(state_schema.data)["properties"]["q"]["description"]
    assert "rad" in q and f"[1] {JOINTS[1]}" in q and f"[{N_JOINTS - 1}] {JOINTS[-1]}" in q
    assert all(ch.metadata["joints"].startswith(JOINTS[0]) for ch in summary.channels.values())


@pytest.mark.system
def test_record_cli_stop_with_outcome(run_dir: Path, tmp_path: Path) -> None:
    pub = _publisher(run_dir, "--duration", "30")
    rec = subprocess.Popen([sys.executable, "-m", "runtime.cli", "record", "serve",
                            "--config", str(REPO / "configs/sim.yaml"), "--run-dir",
                            str(run_dir), "--dir", str(tmp_path / "rec")], cwd=REPO)
    cli = [sys.executable, "-m", "runtime.cli", "record"]
    try:
        _wait_for(run_dir / "recorder")
        out = subprocess.run([*cli, "start", "cli-ep", "--run-dir", str(run_dir)],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "duet record stop" in out.stdout, out
        time.sleep(1.0)
        out = subprocess.run([*cli, "stop", "--success", "--run-dir", str(run_dir), "--json"],
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["outcome"] == "success"
        status = subprocess.run([*cli, "status", "--run-dir", str(run_dir)],
                                capture_output=True, text=True, timeout=30)
        assert "rejected: none" in status.stdout, status.stdout
        info = subprocess.run([*cli, "info", str(tmp_path / "rec/episodes/cli-ep.mcap")],
                              capture_output=True, text=True, timeout=30)
        assert "duet.outcome.outcome: success" in info.stdout, info.stdout
        assert "/follower/state" in info.stdout and "complete" in info.stdout
    finally:
        for proc in (rec, pub):
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 4 MiB file system (tmpfs), so the disk really fills up."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs",
                                            str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.system
def test_full_disk_drops_oldest_segments_and_keeps_the_incident(run_dir: Path,
                                                                small_disk: Path) -> None:
    old = small_disk / "continuous"
    old.mkdir()
    (small_disk / "episodes").mkdir()
    (small_disk / "episodes/keep.mcap").write_bytes(b"\1" * 100_000)
    for i, name in enumerate(("old1.mcap", "old2.mcap", "old3.mcap")):
        # the last one fills the disk up to the last 16 KiB
        size = 1200 * 1024 if i < 2 else shutil.disk_usage(small_disk).free - 16 * 1024
        (old / name).write_bytes(os.urandom(size))
        os.utime(old / name, (1_000_000 + i, 1_000_000 + i))
    # the budget alone would keep everything: only the free space forces deletions
    rec = Recorder(str(run_dir), small_disk, ring_s=1.0, budget_mb=100.0, metadata={},
                   frame_hz=0.0, post_s=2.0, reserve_mb=0.0)
    pub = _publisher(run_dir, "--fault-after", "1.5", "--duration", "12")
    try:
        end = time.monotonic() + 10
        while time.monotonic() < end and not (rec.stats.incidents and rec.incident is None):
            rec.poll_once(50)
    finally:
        pub.kill()
        pub.wait()
        rec.close()
    incidents = list((small_disk / "incidents").glob("*-FAULT.mcap"))
    assert len(incidents) == 1
    assert rec.stats.write_errors >= 1  # the disk really was full
    left = sorted(p.name for p in old.glob("*.mcap"))
    assert "old1.mcap" not in left  # oldest first
    assert (small_disk / "episodes/keep.mcap").exists()
    contents = read_recording(incidents[0])
    modes = [json.loads(d)["mode"] for t, _, _, d in contents.messages if t == "/follower/state"]
    assert "FAULT" in modes and modes.index("FAULT") > 50  # the ring before it, then after
    assert contents.metadata["duet"]["reason"] == "bus errors past threshold"


def test_an_episode_keeps_its_own_instruction_when_the_next_task_comes_first(
        run_dir: Path, tmp_path: Path) -> None:
    """A sim (or fleet) task source may announce the next task before the operator stops the
    episode: the outcome names the task the episode ran, and every one heard."""
    rec = Recorder(str(run_dir), tmp_path / "rec", 1.0, 100.0, {})

    def task(seq: int, text: str) -> None:  # what the planner reports working on
        rec.handle("/planner/telemetry", {"v": 1, "type": "telemetry", "seq": seq,
                                          "t_ns": time.monotonic_ns(), "source": "planner",
                                          "episode": seq, "instruction": text})

    try:
        task(1, "touch the red block")
        rec.start_episode("ep")
        task(2, "touch the blue block")
        stopped = rec.stop_episode(True)
    finally:
        rec.close()
    outcome = read_recording(Path(stopped["path"])).metadata["duet.outcome"]
    assert outcome["instruction"] == "touch the red block"
    assert json.loads(outcome["instructions"]) == ["touch the red block", "touch the blue block"]


def test_an_episode_is_labelled_with_the_task_that_ran_not_the_sims(
        run_dir: Path, tmp_path: Path) -> None:
    """An operator's task takes precedence over the sim's episode feed: the planner works on
    it while the sim keeps announcing its own. The label is the planner's task; `duet record
    start --task` names it outright."""
    rec = Recorder(str(run_dir), tmp_path / "rec", 1.0, 100.0, {})
    t = time.monotonic_ns

    try:
        rec.handle("/sim/task", {"v": 1, "type": "task", "seq": 1, "t_ns": t(), "episode": 1,
                                 "instruction": "touch the blue block"})
        rec.handle("/planner/telemetry", {"v": 1, "type": "telemetry", "seq": 1, "t_ns": t(),
                                          "source": "planner", "episode": None,
                                          "instruction": "touch the red block"})
        rec.start_episode("ep")
        rec.handle("/sim/task", {"v": 1, "type": "task", "seq": 2, "t_ns": t(), "episode": 2,
                                 "instruction": "touch the green block"})
        first = rec.stop_episode(True)
        rec.start_episode("ep2", "wave")
        second = rec.stop_episode(True)
        with pytest.raises(RequestError, match="task"):
            rec.start_episode("ep3", 17)
    finally:
        rec.close()
    outcome = read_recording(Path(first["path"])).metadata["duet.outcome"]
    assert outcome["instruction"] == "touch the red block"
    assert json.loads(outcome["instructions"]) == ["touch the red block"]
    contents = read_recording(Path(second["path"]))
    assert contents.metadata["duet"]["instruction"] == "wave"
    assert contents.metadata["duet.outcome"]["instruction"] == "wave"


@pytest.mark.system
def test_a_full_disk_never_deletes_the_incident_and_status_says_so(run_dir: Path,
                                                                   small_disk: Path) -> None:
    """Nothing but the recorder's own files to delete and less free than the reserve: the
    FAULT incident is written into the reserve and kept (the budget used to delete the file it
    had just closed), continuous recording pauses, and status says the disk is full and what
    was dropped."""
    (small_disk / "other").write_bytes(os.urandom(shutil.disk_usage(small_disk).free
                                                  - 1536 * 1024))  # 1.5 MiB left
    rec = Recorder(str(run_dir), small_disk / "rec", ring_s=1.0, budget_mb=100.0,
                   metadata={}, frame_hz=0.0, post_s=1.0, reserve_mb=2.0, continuous=True)
    pub = _publisher(run_dir, "--fault-after", "1.5", "--duration", "12")
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end and not (rec.stats.incidents and rec.incident is None):
            rec.poll_once(50)
        status = rec.status()
    finally:
        pub.kill()
        pub.wait()
        rec.close()
    incidents = list((small_disk / "rec/incidents").glob("*-FAULT.mcap"))
    assert len(incidents) == 1 and incidents[0].stat().st_size > 0
    assert status["disk_full"] is True
    assert status["dropped"].get("continuous: disk full", 0) > 0
    assert read_recording(incidents[0]).metadata["duet"]["reason"] == \
        "bus errors past threshold"
