"""Cameras for the planner process: the newest frame, its capture time, and stall detection.

`SimCamera` subscribes to the sim's frame stream (ZeroMQ, msgpack `frame` messages as in
DESIGN.md); `V4L2Camera` grabs from a V4L2 device in a background thread (OpenCV, imported
only when used). Timestamps are `time.monotonic_ns()` at capture (sim) or at grab (V4L2),
so `age_ms` compares against the same clock as everything else on the host.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Protocol

import msgpack
import numpy as np
import zmq

_FRAME_VERSION = 1  # the wire-message schema version (runtime/ipc/messages.py VERSION)


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # uint8 [H, W, 3], RGB
    capture_t_ns: int  # time.monotonic_ns() at capture
    seq: int  # increases by one per frame this camera delivered
    episode: int | None = None  # sim only: the episode the frame belongs to


class CameraError(Exception):
    """A camera that cannot be opened or has stopped delivering."""


class Camera(Protocol):
    def read_latest(self) -> Frame | None:
        """The newest frame, or None before the first one."""
        ...

    def age_ms(self) -> float:
        """Milliseconds since the newest frame was captured (inf before the first)."""
        ...

    def is_stale(self, max_age_ms: float) -> bool: ...

    def close(self) -> None: ...


def _age_ms(frame: Frame | None) -> float:
    if frame is None:
        return float("inf")
    return (time.monotonic_ns() - frame.capture_t_ns) / 1e6


def decode_frame_message(
    payload: bytes, height: int, width: int, camera: str | None = None
) -> tuple[np.ndarray, int, int] | None:
    """(image, capture_t_ns, episode) from a sim `frame` message, None for another message
    type (or another camera's frame) on the same socket; ValueError for garbage or a
    malformed frame.

    A local decoder because drivers/ does not import runtime/: a msgpack map with v, type,
    camera (name), image = {"dtype": "|u1", "shape": [H, W, 3], "data": bytes},
    capture_t_ns, episode.
    """
    try:
        msg = msgpack.unpackb(payload, raw=False)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise ValueError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict) or msg.get("v") != _FRAME_VERSION:
        raise ValueError("not a version-1 wire message")
    if msg.get("type") != "frame":
        return None
    if camera is not None and msg.get("camera", "scene") != camera:
        return None
    img, t_ns, episode = msg.get("image"), msg.get("capture_t_ns"), msg.get("episode", -1)
    if not isinstance(t_ns, int) or not isinstance(episode, int):
        raise ValueError("capture_t_ns and episode must be integers")
    if not isinstance(img, dict) or img.get("dtype") != "|u1" \
            or not isinstance(img.get("data"), bytes):
        raise ValueError("image must be a uint8 array object")
    if img.get("shape") != [height, width, 3] or len(img["data"]) != height * width * 3:
        raise ValueError(f"image shape {img.get('shape')!r}, expected [{height}, {width}, 3]")
    return np.frombuffer(img["data"], dtype=np.uint8).reshape(height, width, 3), t_ns, episode


MAX_MESSAGE_BYTES = (1 << 24) + (1 << 16)  # a 16 MB frame and its keys


class SimCamera:
    """The sim's rendered frames from its PUB socket (e.g. ipc://RUN_DIR/sim).

    The socket also carries other message types (task announcements); they and malformed
    frames are skipped, the latter counted in `dropped`.
    """

    def __init__(self, endpoint: str, width: int = 96, height: int = 96,
                 context: zmq.Context[Any] | None = None, camera: str = "scene",
                 max_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.width, self.height, self.camera = width, height, camera
        self.dropped = 0
        self._latest: Frame | None = None
        self._seq = 0
        ctx = context if context is not None else zmq.Context.instance()
        self._sub = ctx.socket(zmq.SUB)
        # the message cap every duet socket has (runtime/ipc/sockets.py: drivers import none
        # of the runtime, so the runtime passes its cap for the sim's socket in)
        self._sub.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.RCVHWM, 16)
        self._sub.connect(endpoint)

    def read_latest(self) -> Frame | None:
        while True:  # drain: only the newest frame matters
            try:
                parts = self._sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return self._latest
            try:
                decoded = decode_frame_message(parts[-1], self.height, self.width,
                                               self.camera)
            except ValueError:
                self.dropped += 1
                continue
            if decoded is None:
                continue
            image, t_ns, episode = decoded
            self._seq += 1
            self._latest = Frame(image, t_ns, self._seq, episode)

    def age_ms(self) -> float:
        return _age_ms(self._latest)

    def is_stale(self, max_age_ms: float) -> bool:
        self.read_latest()
        return self.age_ms() > max_age_ms

    def close(self) -> None:
        self._sub.close(linger=0)


class V4L2Camera:
    """A V4L2 device (e.g. /dev/video0) grabbed continuously in a background thread."""

    def __init__(self, device: str, width: int = 96, height: int = 96, fps: float = 15.0) -> None:
        if not os.path.exists(device):
            raise CameraError(f"camera {device}: no such device (is it plugged in, and does the"
                              " udev rule / container pass it through?)")
        try:
            import cv2  # optional dependency (extra "camera"), loaded only for real cameras
        except ImportError as exc:
            raise CameraError(f"camera {device}: OpenCV is not installed; install the camera "
                              "extra (pip install 'duet-runtime[camera]')") from exc

        self._cv2 = cv2
        self.device, self.width, self.height = device, width, height
        self._cap = cv2.VideoCapture(device, cv2.CAP_V4L2)
        if not self._cap.isOpened():
            raise CameraError(f"camera {device}: OpenCV could not open it as a V4L2 device"
                              " (permissions: is the user in group 'video'?)")
        self._cap.set(cv2.CAP_PROP_FPS, fps)
        self._cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not a queue of old ones
        self.grab_errors = 0
        self._lock = threading.Lock()
        self._latest: Frame | None = None
        self._seq = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._grab_loop, name=f"camera {device}",
                                        daemon=True)
        self._thread.start()

    def _grab_loop(self) -> None:
        cv2 = self._cv2
        while not self._stop.is_set():
            ok, bgr = self._cap.read()
            t_ns = time.monotonic_ns()
            if not ok or bgr is None:
                self.grab_errors += 1
                self._stop.wait(0.01)  # a device that went away must not spin a core
                continue
            if bgr.shape[:2] != (self.height, self.width):
                bgr = cv2.resize(bgr, (self.width, self.height), interpolation=cv2.INTER_AREA)
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            with self._lock:
                self._seq += 1
                self._latest = Frame(rgb, t_ns, self._seq)

    def read_latest(self) -> Frame | None:
        with self._lock:
            return self._latest

    def age_ms(self) -> float:
        return _age_ms(self.read_latest())

    def is_stale(self, max_age_ms: float) -> bool:
        return self.age_ms() > max_age_ms

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._cap.release()
