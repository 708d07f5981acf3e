"""A LeRobotDataset v3.0 folder (what `duet dataset export` writes, or any v3.0 dataset with
a joint state, a camera and tasks) read back as planner training samples.

Per frame: the camera image, the task's tokens, the joint state q, and the chunk label: the
joint state at t + (k+1)·dt for k < horizon (the last frame repeats past the episode's end,
as LeRobot pads). The label is where the arm went, not the follower's command (`action`):
the follower adds its own residual to whatever the planner plans, so learning its commands
would add the residual twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from runtime.model.tokenizer import Tokenizer

STATE = "observation.state"


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on (the message names file and field)."""


def _video_frames(path: Path) -> dict[int, np.ndarray]:
    """Every frame of an mp4 by its frame number (presentation time x frame rate)."""
    import av

    out: dict[int, np.ndarray] = {}
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or 0)
        if rate <= 0:
            raise DatasetError(f"{path}: no frame rate")
        for frame in container.decode(stream):
            if frame.time is not None:
                out[round(frame.time * rate)] = frame.to_ndarray(format="rgb24")
    return out


def load_planner_samples(root: Path, tokenizer: Tokenizer, horizon: int, dt_s: float,
                         camera: str) -> dict[str, np.ndarray]:
    """image uint8 [N,H,W,3], tokens int64 [N,T], q float32 [N,J], chunk float32 [N,H,J],
    episode int32 [N] (the dataset's episode_index)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    info_path = root / "meta/info.json"
    try:
        info = json.loads(info_path.read_text())
    except (OSError, ValueError) as exc:
        raise DatasetError(f"{info_path}: {exc}") from None
    if info.get("codebase_version") != "v3.0":
        raise DatasetError(f"{info_path}: codebase_version {info.get('codebase_version')!r}, "
                           "not 'v3.0'")
    feats: dict[str, Any] = info.get("features", {})
    key = f"observation.images.{camera}"
    if STATE not in feats or feats.get(key, {}).get("dtype") != "video":
        raise DatasetError(f"{info_path}: needs features {STATE!r} and a video {key!r} "
                           f"(has {sorted(feats)})")
    fps = float(info["fps"])
    files = sorted((root / "data").glob("chunk-*/file-*.parquet"))
    if not files:
        raise DatasetError(f"{root}/data: no parquet files")
    frames = pa.concat_tables([pq.read_table(f, columns=[STATE, "episode_index",
                                                         "frame_index", "timestamp"])
                               for f in files])
    episodes = pq.read_table(sorted((root / "meta/episodes").glob("chunk-*/file-*.parquet")))
    ep_index = frames.column("episode_index").to_numpy()
    q_all = frames.column(STATE).combine_chunks().flatten().to_numpy() \
        .reshape(len(frames), -1).astype(np.float32)
    videos: dict[tuple[int, int], dict[int, np.ndarray]] = {}
    out: dict[str, list[np.ndarray]] = {"image": [], "tokens": [], "q": [], "chunk": [],
                                        "episode": []}
    for row in episodes.to_pylist():
        e = int(row["episode_index"])
        idx = np.flatnonzero(ep_index == e)
        idx = idx[np.argsort(frames.column("frame_index").to_numpy()[idx], kind="stable")]
        if len(idx) == 0:
            continue
        where = (int(row[f"videos/{key}/chunk_index"]), int(row[f"videos/{key}/file_index"]))
        if where not in videos:
            videos[where] = _video_frames(root / info["video_path"].format(
                video_key=key, chunk_index=where[0], file_index=where[1]))
        first = round(float(row[f"videos/{key}/from_timestamp"]) * fps)
        missing = [i for i in range(len(idx)) if first + i not in videos[where]]
        if missing:
            raise DatasetError(f"{root}: episode {e}: {len(missing)} frames missing from "
                               f"{key} file {where}")
        q = q_all[idx]
        task = row["tasks"][0] if row.get("tasks") else ""
        tokens = tokenizer.encode(task)
        t = np.arange(len(idx)) / fps
        ahead = t[:, None] + dt_s * np.arange(1, horizon + 1)[None, :]  # [T, H]
        chunk = np.stack([np.interp(ahead, t, q[:, j]) for j in range(q.shape[1])], axis=-1)
        for i in range(len(idx)):
            out["image"].append(videos[where][first + i])
            out["tokens"].append(tokens)
            out["q"].append(q[i])
            out["chunk"].append(chunk[i].astype(np.float32))
            out["episode"].append(np.int32(e))
    if not out["q"]:
        raise DatasetError(f"{root}: no frames")
    return {k: np.stack(v) for k, v in out.items()}
