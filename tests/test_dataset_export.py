"""`duet dataset export --format lerobot` on recordings the real stack made in this test: the
sim robot, the follower and the flight recorder as processes, the scripted expert
teleoperating (`sim.teleop.collect`), one episode estopped by the operator. The dataset is
checked against what the recordings hold (read independently with the recorder's reader),
not against a copied fixture."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sim_arm import JOINTS, N_JOINTS

from runtime.config import load_config
from runtime.ipc import endpoints
from runtime.ipc.rpc import request_at
from runtime.observe.mcap_sink import read_recording

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parents[1]
FPS = 10


def _duet(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four teleoperated episodes of the 'B after A' task; the operator estops (and resets)
    the follower during the third."""
    from sim.teleop import collect

    os.environ.setdefault("MUJOCO_GL", "egl")
    work = tmp_path_factory.mktemp("rec")
    cfg = load_config(ROOT / "configs/sim.yaml", None, [
        f"run_dir={work / 'run'}", "sim.phrasing=after", "sim.two_step_fraction=1.0",
        "sim.seed=3", "follower.deadline_storm.misses=400"])

    def estop_third(n: int) -> None:
        if n == 2:
            control = endpoints.control(cfg.run_dir)
            assert request_at(control, "estop", {"reason": "test"}, 5.0)["ok"]
            time.sleep(0.5)
            assert request_at(control, "reset", {}, 10.0)["ok"]

    results = collect(cfg, work / "rec", 4, frame_hz=10.0, during=estop_third,
                      log_line=lambda _: None)
    assert len(results) == 4
    return work / "rec" / "episodes"


def _export(src: Path | list[Path], out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    paths = [str(p) for p in (src if isinstance(src, list) else [src])]
    return _duet("dataset", "export", *paths, "--out", str(out), "--format", "lerobot",
                 "--fps", str(FPS), *extra)


def _states(path: Path) -> dict[str, Any]:
    """What the recorder wrote, read with its own reader: joint states, frames, results."""
    contents = read_recording(path)
    states = [json.loads(d) for t, _, _, d in contents.messages if t == "/follower/state"]
    frames = [json.loads(d) for t, _, _, d in contents.messages if t == "/sim/frame"]
    results = [json.loads(d) for t, _, _, d in contents.messages if t == "/sim/episode"]
    return {"t": np.array([s["t_read_ns"] for s in states]),
            "q": np.array([s["q"] for s in states]),
            "q_cmd": np.array([s["q_cmd"] for s in states]),
            "modes": {s["mode"] for s in states}, "frames": frames, "results": results,
            "meta": contents.metadata}


@pytest.fixture(scope="module")
def dataset(recordings: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "ds"
    proc = _export(recordings, out)
    assert proc.returncode == 0, proc.stderr
    assert "ESTOP" in proc.stdout  # said why the estopped episode is not in it
    return out


def test_layout_is_lerobot_v3(dataset: Path) -> None:
    info = json.loads((dataset / "meta/info.json").read_text())
    assert info["codebase_version"] == "v3.0" and info["fps"] == FPS
    assert info["robot_type"] == "duet-sim-arm"
    assert info["chunks_size"] == 1000
    assert info["data_files_size_in_mb"] > 0 and info["video_files_size_in_mb"] > 0
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"] == \
        "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
    assert info["total_episodes"] == 3 and info["splits"] == {"train": "0:3"}
    feats = info["features"]
    for key in ("observation.state", "observation.velocity", "observation.effort", "action"):
        assert feats[key] == {"dtype": "float32", "shape": [N_JOINTS], "names": JOINTS}
    video = feats["observation.images.scene"]
    assert video["dtype"] == "video" and video["shape"] == [96, 96, 3]
    assert video["names"] == ["height", "width", "channels"]
    assert video["info"]["video.codec"] == "h264" and video["info"]["video.fps"] == FPS
    assert video["info"]["video.pix_fmt"] == "yuv420p" and not video["info"]["has_audio"]
    for key, dtype in (("timestamp", "float32"), ("frame_index", "int64"),
                       ("episode_index", "int64"), ("index", "int64"), ("task_index", "int64")):
        assert feats[key] == {"dtype": dtype, "shape": [1], "names": None}

    files = sorted(str(p.relative_to(dataset)) for p in dataset.rglob("*") if p.is_file())
    assert files == ["data/chunk-000/file-000.parquet", "meta/episodes/chunk-000/file-000.parquet",
                     "meta/info.json", "meta/stats.json", "meta/tasks.parquet",
                     "videos/observation.images.scene/chunk-000/file-000.mp4"]
    data = pq.read_table(dataset / info["data_path"].format(chunk_index=0, file_index=0))
    assert data.column_names == [k for k, f in feats.items() if f["dtype"] != "video"]
    assert data.schema.field("observation.state").type == pa.list_(pa.float32(), N_JOINTS)
    assert data.schema.field("index").type == pa.int64()
    assert data.schema.field("timestamp").type == pa.float32()
    assert len(data) == info["total_frames"]
    assert data.column("index").to_pylist() == list(range(len(data)))

    tasks = pq.read_table(dataset / "meta/tasks.parquet")
    assert tasks.column_names == ["task_index", "task"]
    pandas = json.loads(tasks.schema.metadata[b"pandas"])
    assert pandas["index_columns"] == ["task"]  # pd.read_parquet: the task is the index
    assert info["total_tasks"] == len(tasks)

    episodes = pq.read_table(dataset / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    start = 0
    for e, row in enumerate(episodes):
        assert row["episode_index"] == e and row["length"] >= 1
        assert (row["dataset_from_index"], row["dataset_to_index"]) == \
            (start, start + row["length"])
        assert row["data/chunk_index"] == row["data/file_index"] == 0
        assert row["meta/episodes/chunk_index"] == row["meta/episodes/file_index"] == 0
        key = "videos/observation.images.scene"
        assert row[f"{key}/from_timestamp"] == pytest.approx(start / FPS)
        assert row[f"{key}/to_timestamp"] == pytest.approx((start + row["length"]) / FPS)
        assert row["tasks"][0] in tasks.column("task").to_pylist()
        assert row["duet/outcome"] in ("success", "fail") and row["duet/recording"]
        for feature in [*feats]:
            for stat in ("min", "max", "mean", "std", "count"):
                assert f"stats/{feature}/{stat}" in row, (feature, stat)
        assert row["stats/observation.state/count"] == [row["length"]]
        assert np.array(row["stats/observation.images.scene/mean"]).shape == (3, 1, 1)
        start += row["length"]

    stats = json.loads((dataset / "meta/stats.json").read_text())
    q = np.array(data.column("observation.state").to_pylist())
    assert stats["observation.state"]["count"] == [len(data)]
    np.testing.assert_allclose(stats["observation.state"]["mean"], q.mean(0), atol=1e-5)
    np.testing.assert_allclose(stats["observation.state"]["std"], q.std(0), atol=1e-5)
    np.testing.assert_allclose(stats["observation.state"]["max"], q.max(0), atol=1e-6)

    with av.open(str(dataset / "videos/observation.images.scene/chunk-000/file-000.mp4")) as c:
        frames = [f for f in c.decode(video=0)]
    assert len(frames) == len(data) and (frames[0].height, frames[0].width) == (96, 96)
    assert [round(float(f.time) * FPS) for f in frames] == list(range(len(data)))


def test_values_round_trip_from_the_recordings(dataset: Path, recordings: Path) -> None:
    data = pq.read_table(dataset / "data/chunk-000/file-000.parquet").to_pylist()
    episodes = pq.read_table(dataset / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    tasks = pq.read_table(dataset / "meta/tasks.parquet").column("task").to_pylist()
    with av.open(str(dataset / "videos/observation.images.scene/chunk-000/file-000.mp4")) as c:
        video = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    for row in episodes:
        rec = _states(recordings / f"{row['duet/recording']}.mcap")
        # the task is the instruction the sim scored this episode on; the outcome its verdict
        assert [r["instruction"] for r in rec["results"]] == [row["tasks"][0]]
        assert row["duet/outcome"] == ("success" if rec["results"][0]["success"] else "fail")
        assert row["duet/outcome"] == rec["meta"]["duet.outcome"]["outcome"]
        frames = data[row["dataset_from_index"]:row["dataset_to_index"]]
        t0 = max(rec["t"][0], min(f["t_mono_ns"] for f in rec["frames"]))
        step = np.abs(np.diff(rec["q"], axis=0)).max(0)  # largest move between two states
        for i in (0, len(frames) // 2, len(frames) - 1):
            f = frames[i]
            assert f["frame_index"] == i and f["timestamp"] == pytest.approx(i / FPS, abs=1e-6)
            assert tasks[f["task_index"]] == row["tasks"][0]
            t = t0 + round(i * 1e9 / FPS)
            k = int(np.searchsorted(rec["t"], t))  # the states either side of the frame time
            lo, hi = rec["q"][max(k - 1, 0)], rec["q"][min(k, len(rec["q"]) - 1)]
            q = np.array(f["observation.state"])
            assert np.all(q >= np.minimum(lo, hi) - 1e-5) and np.all(q <= np.maximum(lo, hi)
                                                                     + 1e-5), (i, q, lo, hi)
            assert np.all(np.abs(q - lo) <= step + 1e-5)
            lo_c, hi_c = rec["q_cmd"][max(k - 1, 0)], rec["q_cmd"][min(k, len(rec["q"]) - 1)]
            a = np.array(f["action"])
            assert np.all(a >= np.minimum(lo_c, hi_c) - 1e-5) and \
                np.all(a <= np.maximum(lo_c, hi_c) + 1e-5)
            # the image: the newest camera frame captured at or before the frame time
            shown = max((fr for fr in rec["frames"] if fr["t_mono_ns"] <= t),
                        key=lambda fr: fr["t_mono_ns"])
            capture = (shown["t_mono_ns"] - t0) / 1e9
            assert f["capture_timestamp.scene"] == pytest.approx(capture, abs=1e-4)
            raw = np.frombuffer(base64.b64decode(shown["data"]), np.uint8).reshape(96, 96, 3)
            decoded = video[row["dataset_from_index"] + i]
            assert np.abs(decoded.astype(int) - raw).mean() < 6.0  # H.264 at crf 18


def test_export_is_deterministic(dataset: Path, recordings: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert _export(recordings, again).returncode == 0
    files = sorted(p.relative_to(dataset) for p in dataset.rglob("*") if p.is_file()
                   and p.suffix != ".mp4")
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file()
                           and p.suffix != ".mp4")
    for rel in files:
        assert (dataset / rel).read_bytes() == (again / rel).read_bytes(), rel


def test_corrupt_and_truncated_files_are_named_and_skipped(recordings: Path,
                                                           tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(recordings, src)
    good = sorted(src.glob("*.mcap"))[0]
    (src / "cut.mcap").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (src / "garbage.mcap").write_bytes(os.urandom(5000))
    (src / "empty.mcap").write_bytes(b"")
    out = tmp_path / "ds"
    proc = _export(src, out)
    assert proc.returncode == 0, proc.stderr
    for name in ("cut.mcap", "garbage.mcap", "empty.mcap"):
        assert f"skipped {src / name}" in proc.stderr, proc.stderr
    assert json.loads((out / "meta/info.json").read_text())["total_episodes"] == 3


def test_incidents_only_when_asked_and_filters(recordings: Path, tmp_path: Path) -> None:
    estopped = [p for p in sorted(recordings.glob("*.mcap")) if "ESTOP" in _states(p)["modes"]]
    assert [p.name for p in estopped] == ["teleop-002.mcap"]
    out = tmp_path / "all"
    proc = _export(recordings, out, "--include-incidents", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["episodes"] == 4
    rows = pq.read_table(out / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    assert "teleop-002" in [r["duet/recording"] for r in rows]

    one = _export(recordings, tmp_path / "one", "--episodes", "teleop-001", "--json")
    assert json.loads(one.stdout)["episodes"] == 1
    later = _export(recordings, tmp_path / "later", "--since", "2999-01-01")
    assert later.returncode == 1 and "no episode to export" in later.stderr
    refused = _export(recordings, tmp_path, "--json")  # tmp_path is no dataset: not replaced
    assert refused.returncode == 2 and "not a LeRobot dataset" in refused.stderr


@pytest.mark.slow
def test_finetune_smoke(dataset: Path, smoke_training: Path, tmp_path: Path) -> None:
    """`duet train --smoke` for an initial checkpoint, then `duet train --dataset --init`."""
    env = ["--data-dir", str(smoke_training / "data"), "--threads", "1"]
    ck = smoke_training / "ck"
    proc = _duet("train", "--smoke", "--dataset", str(dataset), "--init", str(ck),
                 "--out", str(tmp_path / "ft"), *env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads((tmp_path / "ft/train-metrics.json").read_text())["planner"]
    assert metrics["recorded_frames"] == json.loads(
        (dataset / "meta/info.json").read_text())["total_frames"]
    assert metrics["sim_fraction"] == 0.5 and metrics["val_mae_rad"] is not None
    from policy.models import load_checkpoint

    before, _ = load_checkpoint(ck / "planner.pt")
    after, meta = load_checkpoint(tmp_path / "ft/planner.pt")
    assert meta["finetune"]["dataset"] == str(dataset)
    changed = [n for n, p in after.state_dict().items()
               if not np.array_equal(p.numpy(), before.state_dict()[n].numpy())]
    assert any(n.startswith("grounding.") for n in changed)
    assert not any(n.startswith("vision.") for n in changed)  # the camera stem is frozen
    assert (tmp_path / "ft/follower.pt").read_bytes() == (ck / "follower.pt").read_bytes()


def test_files_roll_over_at_their_size_limits(recordings: Path, tmp_path: Path) -> None:
    """Tiny limits: each episode starts a new data and video file; the episode rows point at
    them and the video ranges restart at 0 in each file."""
    from export.dataset import lerobot
    from export.dataset.select import select
    from runtime.observe.recordings import resample

    frames = [resample(r, FPS) for r in select([recordings]).kept]
    info = lerobot.write(frames, tmp_path, FPS, "t", data_file_mb=1e-6, video_file_mb=1e-6,
                         log=lambda _: None)
    rows = pq.read_table(tmp_path / "meta/episodes/chunk-000/file-000.parquet").to_pylist()
    key = "videos/observation.images.scene"
    for e, row in enumerate(rows):
        assert (row["data/chunk_index"], row["data/file_index"]) == (0, e)
        assert (row[f"{key}/chunk_index"], row[f"{key}/file_index"]) == (0, e)
        assert row[f"{key}/from_timestamp"] == 0.0
        data = pq.read_table(tmp_path / info["data_path"].format(chunk_index=0, file_index=e))
        assert data.column("episode_index").to_pylist() == [e] * row["length"]
        assert data.column("index").to_pylist() == list(range(row["dataset_from_index"],
                                                              row["dataset_to_index"]))
        video = tmp_path / info["video_path"].format(
            video_key="observation.images.scene", chunk_index=0, file_index=e)
        with av.open(str(video)) as c:
            assert sum(1 for _ in c.decode(video=0)) == row["length"]
    cursor = lerobot.Cursor(0, lerobot.CHUNKS_SIZE - 1)
    cursor.advance()
    assert (cursor.chunk, cursor.file) == (1, 0)  # a new chunk folder after chunks_size files
