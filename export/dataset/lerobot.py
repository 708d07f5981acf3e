"""Resampled episodes (runtime/observe/recordings.py) -> a LeRobotDataset v3.0 folder.

Layout, column names, dtypes and file naming follow LeRobot's own writer, checked against
huggingface/lerobot `src/lerobot/datasets/utils.py` (path templates, DEFAULT_FEATURES,
`create_empty_dataset_info`, `update_chunk_file_indices`), `compute_stats.py` (per-episode
min/max/mean/std/count, images per channel in [0, 1] with shape (3, 1, 1), the parallel
aggregation), `lerobot_dataset.py` `save_episode_tasks` and the v2.1 -> v3.0 conversion's
`convert_tasks` (tasks.parquet is a pandas frame indexed by the task string, index named
"task", with a `task_index` column), the episode columns those write
(`data/chunk_index`, `videos/<key>/from_timestamp`, `meta/episodes/file_index`, ...), the
`info` block LeRobot writes for a video feature, and the v3.0 blog post (huggingface/blog
lerobot-datasets-v3.md: several episodes per parquet and per mp4 file, located through the
episodes metadata; its `meta/tasks.jsonl` predates the code's `meta/tasks.parquet`).

    meta/info.json              codebase_version "v3.0", fps, features, templates, totals
    meta/stats.json             the statistics over the whole dataset
    meta/tasks.parquet          task (index) -> task_index
    meta/episodes/chunk-000/file-000.parquet   one row per episode (+ duet/* provenance)
    data/chunk-XXX/file-XXX.parquet            one row per frame, many episodes per file
    videos/observation.images.<camera>/chunk-XXX/file-XXX.mp4   H.264, many episodes per file

Besides LeRobot's own columns each frame carries `capture_timestamp.<camera>` (when the
camera took the image shown in that frame, s on the episode's clock) and each episode row
`duet/outcome`, `duet/recording`, `duet/started`, `duet/bundle_version`, `duet/config_hash`.
Everything but the mp4 files is a deterministic function of the episodes (same recordings,
same bytes); an encoder may differ between runs, so videos are excepted.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from runtime.observe.recordings import Frames

CODEBASE_VERSION = "v3.0"
CHUNKS_SIZE = 1000  # files per chunk folder
DATA_FILE_MB = 100
VIDEO_FILE_MB = 500
CHUNK_FILE = "chunk-{chunk_index:03d}/file-{file_index:03d}"
DATA_PATH = "data/" + CHUNK_FILE + ".parquet"
VIDEO_PATH = "videos/{video_key}/" + CHUNK_FILE + ".mp4"
EPISODES_PATH = "meta/episodes/" + CHUNK_FILE + ".parquet"
DEFAULT_FEATURES = {k: {"dtype": d, "shape": [1], "names": None} for k, d in (
    ("timestamp", "float32"), ("frame_index", "int64"), ("episode_index", "int64"),
    ("index", "int64"), ("task_index", "int64"))}
VIDEO_CODEC = "libx264"  # H.264: what every player and LeRobot's decoders read
VIDEO_PIX_FMT = "yuv420p"
VIDEO_GOP = 2  # LeRobot's choice: a keyframe every other frame keeps random access cheap
STATS = ("min", "max", "mean", "std", "count")
Log = Callable[[str], None]


def image_key(camera: str) -> str:
    return f"observation.images.{camera}"


def capture_key(camera: str) -> str:
    return f"capture_timestamp.{camera}"


# The joint-vector features: dataset key -> (Frames attribute, what it is).
VECTORS = {"observation.state": ("state", "joint position, rad"),
           "observation.velocity": ("velocity", "joint velocity, rad/s"),
           "observation.effort": ("effort", "joint effort, N·m"),
           "action": ("action", "the follower's joint command, rad")}


@dataclass
class Cursor:
    """chunk-XXX/file-XXX of the file being written; `advance` as LeRobot's
    update_chunk_file_indices (a new chunk folder every CHUNKS_SIZE files)."""

    chunk: int = 0
    file: int = 0

    def advance(self) -> None:
        self.chunk, self.file = (self.chunk + 1, 0) if self.file == CHUNKS_SIZE - 1 \
            else (self.chunk, self.file + 1)

    def path(self, template: str, **keys: str) -> str:
        return template.format(chunk_index=self.chunk, file_index=self.file, **keys)


def features(joints: list[str], cameras: dict[str, tuple[int, int]], fps: int
             ) -> dict[str, Any]:
    out: dict[str, Any] = {key: {"dtype": "float32", "shape": [len(joints)],
                                 "names": list(joints)} for key in VECTORS}
    for name, (h, w) in cameras.items():
        out[image_key(name)] = {
            "dtype": "video", "shape": [h, w, 3], "names": ["height", "width", "channels"],
            "info": {"video.height": h, "video.width": w, "video.codec": "h264",
                     "video.pix_fmt": VIDEO_PIX_FMT, "video.is_depth_map": False,
                     "video.fps": fps, "video.channels": 3, "has_audio": False}}
        out[capture_key(name)] = {"dtype": "float32", "shape": [1], "names": None}
    return {**out, **{k: dict(v) for k, v in DEFAULT_FEATURES.items()}}


def _stats(a: np.ndarray) -> dict[str, np.ndarray]:
    """compute_stats.get_feature_stats over frames (axis 0), vectors kept 1-D."""
    a = a.astype(np.float64).reshape(len(a), -1)
    return {"min": a.min(0), "max": a.max(0), "mean": a.mean(0), "std": a.std(0),
            "count": np.array([len(a)])}


def _image_stats(images: np.ndarray) -> dict[str, np.ndarray]:
    """Per channel over frames and pixels, in [0, 1], shape (3, 1, 1) like LeRobot's."""
    x = images.astype(np.float64) / 255.0  # [T, H, W, 3]
    axes = (0, 1, 2)
    return {"min": x.min(axes).reshape(3, 1, 1), "max": x.max(axes).reshape(3, 1, 1),
            "mean": x.mean(axes).reshape(3, 1, 1), "std": x.std(axes).reshape(3, 1, 1),
            "count": np.array([len(images)])}


def aggregate(stats: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Episode statistics -> dataset statistics (compute_stats.aggregate_feature_stats)."""
    counts = np.stack([s["count"] for s in stats]).astype(np.float64)
    means = np.stack([s["mean"] for s in stats])
    w = counts.reshape(-1, *([1] * (means.ndim - 1)))
    total = counts.sum()
    mean = (means * w).sum(0) / total
    var = ((np.stack([s["std"] for s in stats]) ** 2 + (means - mean) ** 2) * w).sum(0) / total
    return {"min": np.stack([s["min"] for s in stats]).min(0),
            "max": np.stack([s["max"] for s in stats]).max(0), "mean": mean,
            "std": np.sqrt(var), "count": np.array([int(total)])}


def _vector_column(a: np.ndarray) -> pa.Array:
    flat = pa.array(np.ascontiguousarray(a, dtype=np.float32).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, a.shape[1])


class VideoWriter:
    """One camera's mp4 files: episodes appended back to back, a new file once the current
    one passes the size limit (after an episode: an episode never spans two files)."""

    def __init__(self, root: Path, key: str, fps: int, limit_bytes: int) -> None:
        self.root, self.key, self.fps, self.limit = root, key, fps, limit_bytes
        self.cursor = Cursor()
        self.container: Any = None
        self.stream: Any = None
        self.frames = 0  # in the open file
        self.bytes = 0

    def _open(self) -> None:
        import av

        path = self.root / self.cursor.path(VIDEO_PATH, video_key=self.key)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.container = av.open(str(path), "w")
        self.stream = self.container.add_stream(VIDEO_CODEC, rate=Fraction(self.fps))
        self.stream.pix_fmt = VIDEO_PIX_FMT
        self.stream.time_base = Fraction(1, self.fps)
        self.stream.options = {"g": str(VIDEO_GOP), "crf": "18"}
        self.frames = self.bytes = 0

    def _mux(self, packets: Any) -> None:
        for packet in packets:
            self.bytes += packet.size
            self.container.mux(packet)

    def append(self, images: np.ndarray) -> tuple[int, int, float, float]:
        """Encode one episode's frames; (chunk, file, from_timestamp, to_timestamp)."""
        import av

        if self.container is None:
            self._open()
            self.stream.height, self.stream.width = images.shape[1:3]
        first = self.frames
        for image in images:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = self.frames
            self._mux(self.stream.encode(frame))
            self.frames += 1
        where = (self.cursor.chunk, self.cursor.file, first / self.fps, self.frames / self.fps)
        if self.bytes >= self.limit:
            self.close()
            self.cursor.advance()
        return where

    def close(self) -> None:
        if self.container is not None:
            self._mux(self.stream.encode(None))
            self.container.close()
            self.container = None


@dataclass
class _Episode:
    row: dict[str, Any]
    stats: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)


def _frame_table(frames: Frames, episode_index: int, first_index: int, task_index: int,
                 cameras: list[str]) -> pa.Table:
    n = len(frames)
    cols: dict[str, pa.Array] = {key: _vector_column(getattr(frames, attr))
                                 for key, (attr, _) in VECTORS.items()}
    for cam in cameras:
        capture = frames.timestamp - frames.image_age_s[cam]
        cols[capture_key(cam)] = pa.array(capture.astype(np.float32))
    cols.update({
        "timestamp": pa.array(frames.timestamp.astype(np.float32)),
        "frame_index": pa.array(np.arange(n, dtype=np.int64)),
        "episode_index": pa.array(np.full(n, episode_index, dtype=np.int64)),
        "index": pa.array(np.arange(first_index, first_index + n, dtype=np.int64)),
        "task_index": pa.array(np.full(n, task_index, dtype=np.int64)),
    })
    return pa.table(cols)


def _column_array(column: pa.ChunkedArray) -> np.ndarray:
    """A frame column as float64 [T, d] (what the statistics are computed on)."""
    arr = column.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        return arr.flatten().to_numpy().reshape(len(arr), arr.type.list_size)
    return arr.to_numpy().reshape(len(arr), 1)


def _stats_columns(stats: dict[str, dict[str, np.ndarray]]) -> dict[str, Any]:
    return {f"stats/{key}/{name}": value.tolist() for key, per in stats.items()
            for name, value in per.items()}


def _tasks_table(tasks: list[str]) -> pa.Table:
    """task_index with the task as the pandas index named "task" (what pd.read_parquet of
    LeRobot's tasks.parquet gives), written without needing pandas."""
    pandas_meta = {
        "index_columns": ["task"],
        "column_indexes": [{"name": None, "field_name": None, "pandas_type": "unicode",
                            "numpy_type": "object", "metadata": {"encoding": "UTF-8"}}],
        "columns": [{"name": "task_index", "field_name": "task_index", "pandas_type": "int64",
                     "numpy_type": "int64", "metadata": None},
                    {"name": "task", "field_name": "task", "pandas_type": "unicode",
                     "numpy_type": "object", "metadata": None}],
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": "2.2.3"}
    table = pa.table({"task_index": pa.array(range(len(tasks)), pa.int64()),
                      "task": pa.array(tasks, pa.string())})
    return table.replace_schema_metadata({b"pandas": json.dumps(pandas_meta).encode()})


def _write_parquet(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="snappy")


def _json(data: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n")


def _sizes(cameras: dict[str, tuple[int, ...]]) -> str:
    """'scene 96x96, wrist 64x64': each camera's width x height."""
    return ", ".join(f"{name} {hw[1]}x{hw[0]}" for name, hw in cameras.items())


def write(episodes: list[Frames], out: Path, fps: int, robot_type: str | None,
          data_file_mb: float = DATA_FILE_MB, video_file_mb: float = VIDEO_FILE_MB,
          log: Log = print) -> dict[str, Any]:
    """Write the dataset into `out` (a fresh folder); returns meta/info.json's content."""
    if not episodes:
        raise ValueError("no episodes to write")
    joints = episodes[0].recording.joints
    cameras = {name: images.shape[1:3] for name, images in episodes[0].images.items()}
    for ep in episodes:
        if ep.recording.joints != joints:
            raise ValueError(f"{ep.recording.path}: joints {', '.join(ep.recording.joints)} differ "
                             f"from {', '.join(joints)} ({episodes[0].recording.path})")
        shapes = {name: images.shape[1:3] for name, images in ep.images.items()}
        if shapes != cameras:
            raise ValueError(f"{ep.recording.path}: cameras {_sizes(shapes)} differ from "
                             f"{_sizes(cameras)} "
                             f"({episodes[0].recording.path})")
    for name, (h, w) in cameras.items():
        if h % 2 or w % 2:
            raise ValueError(f"camera {name!r}: {w}x{h} cannot be encoded as {VIDEO_PIX_FMT} "
                             "(needs even width and height)")
    feats = features(joints, {k: (int(h), int(w)) for k, (h, w) in cameras.items()}, fps)
    tasks: list[str] = []
    videos = {name: VideoWriter(out, image_key(name), fps, int(video_file_mb * 2**20))
              for name in cameras}
    data_cursor, pending_bytes = Cursor(), 0
    pending: list[pa.Table] = []
    rows: list[_Episode] = []
    total = 0

    def flush_data() -> None:
        nonlocal pending, pending_bytes
        if pending:
            _write_parquet(pa.concat_tables(pending), out / data_cursor.path(DATA_PATH))
            data_cursor.advance()
        pending, pending_bytes = [], 0

    try:
        for index, ep in enumerate(episodes):
            rec = ep.recording
            if rec.instruction not in tasks:
                tasks.append(rec.instruction)
            task_index = tasks.index(rec.instruction)
            table = _frame_table(ep, index, total, task_index, list(cameras))
            if pending and pending_bytes >= data_file_mb * 2**20:
                flush_data()
            pending.append(table)
            pending_bytes += table.nbytes
            row: dict[str, Any] = {
                "episode_index": index, "tasks": [rec.instruction], "length": len(ep),
                "data/chunk_index": data_cursor.chunk, "data/file_index": data_cursor.file,
                "dataset_from_index": total, "dataset_to_index": total + len(ep)}
            stats = {key: _stats(_column_array(table.column(key)))
                     for key in feats if feats[key]["dtype"] != "video"}
            for name, writer in videos.items():
                chunk, file, t_from, t_to = writer.append(ep.images[name])
                row.update({f"videos/{image_key(name)}/chunk_index": chunk,
                            f"videos/{image_key(name)}/file_index": file,
                            f"videos/{image_key(name)}/from_timestamp": t_from,
                            f"videos/{image_key(name)}/to_timestamp": t_to})
                stats[image_key(name)] = _image_stats(ep.images[name])
            row.update({"meta/episodes/chunk_index": 0, "meta/episodes/file_index": 0,
                        "duet/outcome": rec.outcome, "duet/recording": rec.name,
                        "duet/started": rec.started.isoformat() if rec.started else "",
                        "duet/bundle_version": rec.metadata.get("bundle_version", ""),
                        "duet/config_hash": rec.metadata.get("config_hash", "")})
            rows.append(_Episode(row, stats))
            total += len(ep)
            log(f"  episode {index}: {rec.name} ({len(ep)} frames, {rec.outcome}) "
                f"{rec.instruction!r}")
        flush_data()
    finally:
        for writer in videos.values():
            writer.close()

    _write_parquet(pa.Table.from_pylist([{**e.row, **_stats_columns(e.stats)} for e in rows]),
                   out / Cursor().path(EPISODES_PATH))
    _write_parquet(_tasks_table(tasks), out / "meta/tasks.parquet")
    keys = list(rows[0].stats)
    _json({key: {k: v.tolist() for k, v in aggregate([e.stats[key] for e in rows]).items()}
           for key in keys}, out / "meta/stats.json")
    info = {"codebase_version": CODEBASE_VERSION, "robot_type": robot_type,
            "total_episodes": len(rows), "total_frames": total, "total_tasks": len(tasks),
            "chunks_size": CHUNKS_SIZE, "data_files_size_in_mb": data_file_mb,
            "video_files_size_in_mb": video_file_mb, "fps": fps,
            "splits": {"train": f"0:{len(rows)}"}, "data_path": DATA_PATH,
            "video_path": VIDEO_PATH if cameras else None, "features": feats}
    _json(info, out / "meta/info.json")
    return info


def replace_folder(out: Path, build: Callable[[Path], Any]) -> Any:
    """Build into a sibling temp folder, then swap it in: a failed export leaves the old
    dataset (or nothing) behind, never half a dataset. An existing `out` must be a dataset."""
    if out.exists() and not (out / "meta/info.json").is_file() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not a LeRobot dataset: refusing to replace it")
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        result = build(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return result
