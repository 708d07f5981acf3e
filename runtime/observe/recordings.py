"""Recorded episodes (the flight recorder's MCAP files, runtime/observe/recorder.py) read back
and resampled onto a fixed frame rate.

One `Recording` per file: the joint state and the follower's command at the follower's rate,
each camera's frames, the instruction, the outcome and where the file came from. `resample`
puts them on a common clock at `fps` frames per second: joint values are interpolated
linearly between the follower's samples (500 Hz and up: the error is far below the servo
resolution), a camera contributes the newest frame captured at or before each frame time
(sample and hold), and its capture time is kept so a reader knows how old each image is.

Every time is the sender's CLOCK_MONOTONIC stamp (`t_read_ns` of a state: the bus read;
`t_mono_ns` of a frame: the capture), one clock for all processes on the robot, so state and
images line up without the wall clock's NTP steps.

Nothing here trusts the file: a cut-off or corrupt file, a message that is not what its schema
says, non-finite values or too few samples raise `RecordingError` naming the file and why,
and the caller skips that file.
"""

from __future__ import annotations

import base64
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from runtime.follower.identification import Track, track
from runtime.ipc.follower_mode import LATCHED_MODES
from runtime.observe.mcap_sink import read_recording

MAX_IMAGE_PIXELS = 4096 * 4096


class RecordingError(ValueError):
    """A recording that cannot be exported (the message names the file and the reason)."""


@dataclass
class Camera:
    t_ns: np.ndarray  # int64 [M] capture times
    images: list[bytes]  # raw rgb8 per frame (decoded lazily: most are dropped by resampling)
    height: int
    width: int

    def image(self, i: int) -> np.ndarray:
        return np.frombuffer(self.images[i], np.uint8).reshape(self.height, self.width, 3)


@dataclass
class Recording:
    path: Path
    name: str
    kind: str  # "episode", "incident" or "continuous" (the recorder's metadata)
    instruction: str
    outcome: str  # "success", "fail" or "unknown"
    started: datetime | None
    joints: list[str]
    metadata: dict[str, str]
    t_ns: np.ndarray  # int64 [N] bus read times of the joint states
    q: np.ndarray  # float64 [N, J] rad
    dq: np.ndarray  # rad/s
    effort: np.ndarray  # N·m
    q_cmd: np.ndarray  # the follower's command, rad
    modes: set[str] = field(default_factory=set)  # follower modes seen
    cameras: dict[str, Camera] = field(default_factory=dict)

    @property
    def alarm(self) -> str | None:
        """FAULT or ESTOP when the follower entered it during the recording."""
        return next((m for m in LATCHED_MODES if m in self.modes), None)


@dataclass
class Frames:
    """One recording on a fixed frame clock: what a dataset stores per episode."""

    recording: Recording
    fps: float
    timestamp: np.ndarray  # float64 [T] s since the episode's first frame
    state: np.ndarray  # float32 [T, J]
    velocity: np.ndarray
    effort: np.ndarray
    action: np.ndarray
    images: dict[str, np.ndarray]  # camera -> uint8 [T, H, W, 3]
    image_age_s: dict[str, np.ndarray]  # camera -> float64 [T]: frame time - capture time

    def __len__(self) -> int:
        return len(self.timestamp)


def _vector(body: dict[str, Any], key: str, n: int, where: str) -> list[float]:
    value = body.get(key)
    if not isinstance(value, list) or len(value) != n:
        raise RecordingError(f"{where}: `{key}` is not {n} numbers")
    return value


def _started(meta: dict[str, str]) -> datetime | None:
    try:
        when = datetime.fromisoformat(meta.get("started", ""))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def read(path: Path) -> Recording:
    """A complete recording, checked; RecordingError for anything that is not."""
    try:
        contents = read_recording(path)
    except OSError as exc:
        raise RecordingError(f"{path}: unreadable: {exc.strerror or exc}") from None
    if not contents.complete:
        raise RecordingError(f"{path}: cut off or corrupt ({contents.error or 'no footer'}; "
                             f"{len(contents.messages)} messages before it)")
    meta = contents.metadata.get("duet", {})
    end = contents.metadata.get("duet.outcome", {})
    joints = [j for j in meta.get("joints", "").split(",") if j]
    if not joints:
        raise RecordingError(f"{path}: metadata `duet.joints` is missing")
    n = len(joints)
    t, q, dq, effort, q_cmd = [], [], [], [], []
    modes: set[str] = set()
    frames: dict[str, tuple[list[int], list[bytes], tuple[int, int]]] = {}
    heard: Counter[str] = Counter()
    for i, (topic, _schema, _log_ns, data) in enumerate(contents.messages):
        if topic not in ("/follower/state", "/sim/frame", "/follower/telemetry",
                         "/planner/telemetry", "/sim/task"):
            continue
        where = f"{path}: message {i} on {topic}"
        try:
            body = json.loads(data)
        except ValueError:
            raise RecordingError(f"{where}: not JSON") from None
        if not isinstance(body, dict):
            raise RecordingError(f"{where}: not a JSON object")
        if topic == "/follower/telemetry":
            if isinstance(body.get("mode"), str):
                modes.add(body["mode"])
            continue
        if topic in ("/planner/telemetry", "/sim/task"):
            if isinstance(body.get("instruction"), str) and body["instruction"]:
                heard[body["instruction"]] += 1
            continue
        stamp = body.get("t_read_ns") if topic == "/follower/state" else body.get("t_mono_ns")
        if not isinstance(stamp, int):
            raise RecordingError(f"{where}: no integer time stamp")
        if topic == "/follower/state":
            t.append(stamp)
            q.append(_vector(body, "q", n, where))
            dq.append(_vector(body, "dq", n, where))
            effort.append(_vector(body, "effort", n, where))
            q_cmd.append(_vector(body, "q_cmd", n, where))
            if isinstance(body.get("mode"), str):
                modes.add(body["mode"])
            continue
        h, w = body.get("height"), body.get("width")
        if body.get("encoding") != "rgb8" or not isinstance(h, int) or not isinstance(w, int) \
                or not 0 < h * w <= MAX_IMAGE_PIXELS:
            raise RecordingError(f"{where}: not an rgb8 image of a plausible size")
        raw = base64.b64decode(str(body.get("data", "")), validate=True)
        if len(raw) != h * w * 3:
            raise RecordingError(f"{where}: {len(raw)} bytes for a {w}x{h} rgb8 image")
        cam = frames.setdefault(str(body.get("frame_id") or "camera"), ([], [], (h, w)))
        if cam[2] != (h, w):
            raise RecordingError(f"{where}: size changed from {cam[2]} to {(h, w)}")
        cam[0].append(stamp)
        cam[1].append(raw)
    # The task is what the robot worked on for most of the episode: the instruction in the
    # metadata at `record start` can be the previous episode's, and recordings made before the
    # recorder kept each episode's own (its outcome's `instruction`) name the next one at stop.
    instruction = heard.most_common(1)[0][0] if heard else \
        meta.get("instruction") or end.get("instruction", "")
    if len(t) < 2:
        raise RecordingError(f"{path}: {len(t)} joint states; an episode needs at least 2")
    arrays = [np.asarray(a, dtype=np.float64) for a in (q, dq, effort, q_cmd)]
    for name, a in zip(("q", "dq", "effort", "q_cmd"), arrays, strict=True):
        if not np.isfinite(a).all():
            raise RecordingError(f"{path}: non-finite `{name}` in a joint state")
    order = np.argsort(np.asarray(t, dtype=np.int64), kind="stable")
    cameras = {}
    for name, (ts, images, (h, w)) in sorted(frames.items()):
        idx = np.argsort(np.asarray(ts, dtype=np.int64), kind="stable")
        cameras[name] = Camera(np.asarray(ts, dtype=np.int64)[idx],
                               [images[i] for i in idx], h, w)
    return Recording(
        path=path, name=path.stem, kind=meta.get("kind", "episode"),
        instruction=instruction, outcome=end.get("outcome", "unknown"),
        started=_started(meta), joints=joints, metadata={**meta, **end},
        t_ns=np.asarray(t, dtype=np.int64)[order], q=arrays[0][order], dq=arrays[1][order],
        effort=arrays[2][order], q_cmd=arrays[3][order], modes=modes, cameras=cameras)


def read_tracks(paths: list[Path], joints: list[str], tick_s: float
                ) -> tuple[list[Track], list[str]]:
    """Recordings on the tick grid (runtime.follower.identification.Track), and the files
    used; unreadable ones and other robots' are named on stderr and skipped."""
    tracks, used = [], []
    for path in paths:
        try:
            rec = read(path)
        except RecordingError as exc:
            print(f"duet: skipped: {exc}", file=sys.stderr)
            continue
        if rec.joints != joints:
            print(f"duet: skipped {path}: joints {rec.joints} are not this robot's",
                  file=sys.stderr)
            continue
        tracks.append(track(rec.t_ns, rec.q, rec.dq, rec.q_cmd, tick_s))
        used.append(str(path))
    return tracks, used


def resample(rec: Recording, fps: float) -> Frames:
    """The recording at `fps`, from the first instant every camera has a frame to the last
    joint state."""
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps}")
    start = max([int(rec.t_ns[0])] + [int(c.t_ns[0]) for c in rec.cameras.values()])
    end = int(rec.t_ns[-1])
    if end < start:
        raise RecordingError(f"{rec.path}: no joint state after the first camera frame")
    count = int(np.floor((end - start) * fps / 1e9)) + 1
    t = start + np.round(np.arange(count) * (1e9 / fps)).astype(np.int64)
    rel = (rec.t_ns - start).astype(np.float64)
    at = (t - start).astype(np.float64)

    def interp(a: np.ndarray) -> np.ndarray:
        return np.stack([np.interp(at, rel, a[:, j]) for j in range(a.shape[1])],
                        axis=1).astype(np.float32)

    images, ages = {}, {}
    for name, cam in rec.cameras.items():
        idx = np.searchsorted(cam.t_ns, t, side="right") - 1  # newest at or before each t
        images[name] = np.stack([cam.image(i) for i in idx])
        ages[name] = (t - cam.t_ns[idx]) / 1e9
    return Frames(rec, fps, (t - start) / 1e9, interp(rec.q), interp(rec.dq),
                  interp(rec.effort), interp(rec.q_cmd), images, ages)
