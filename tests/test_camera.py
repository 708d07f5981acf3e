"""Cameras: SimCamera against a real ZeroMQ PUB socket; staleness; V4L2 errors."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from drivers.camera import CameraError, SimCamera, V4L2Camera


def frame_message(image: np.ndarray, t_ns: int, episode: int = 0, type_: str = "frame") -> bytes:
    body = {"v": 1, "type": type_, "seq": 1, "t_ns": t_ns,
            "image": {"dtype": image.dtype.str, "shape": list(image.shape),
                      "data": image.tobytes()},
            "capture_t_ns": t_ns, "episode": episode}
    return msgpack.packb(body, use_bin_type=True)


@pytest.fixture
def pub(tmp_path: Path):
    sock: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
    endpoint = f"ipc://{tmp_path / 'sim'}"
    sock.bind(endpoint)
    yield sock, endpoint
    sock.close(linger=0)


def publish_until_seen(sock: zmq.Socket, cam: SimCamera, payload: bytes) -> None:
    """PUB/SUB joins asynchronously: repeat until the subscriber has one."""
    deadline = time.monotonic() + 5.0
    while cam.read_latest() is None:
        assert time.monotonic() < deadline, "subscriber never received a frame"
        sock.send(payload)
        time.sleep(0.01)


def test_sim_camera_gets_the_newest_frame(pub) -> None:
    sock, endpoint = pub
    cam = SimCamera(endpoint)
    try:
        assert cam.read_latest() is None and cam.age_ms() == float("inf")
        first = np.zeros((96, 96, 3), np.uint8)
        publish_until_seen(sock, cam, frame_message(first, time.monotonic_ns()))
        images = [np.full((96, 96, 3), k, np.uint8) for k in (10, 20, 30)]
        for k, img in enumerate(images):
            sock.send(frame_message(img, time.monotonic_ns(), episode=k))
        sock.send(msgpack.packb({"v": 1, "type": "task", "seq": 2, "t_ns": 0}))  # not a frame
        time.sleep(0.1)
        latest = cam.read_latest()
        assert latest is not None
        assert latest.image.shape == (96, 96, 3) and latest.image.dtype == np.uint8
        assert int(latest.image[0, 0, 0]) == 30 and latest.episode == 2
        assert latest.seq >= 4  # every frame counted, only the newest kept
        assert 0 <= cam.age_ms() < 1000 and cam.dropped == 0
    finally:
        cam.close()


def test_malformed_frames_are_dropped_not_raised(pub) -> None:
    sock, endpoint = pub
    cam = SimCamera(endpoint)
    try:
        good = frame_message(np.ones((96, 96, 3), np.uint8), time.monotonic_ns())
        publish_until_seen(sock, cam, good)
        seq = cam.read_latest().seq  # type: ignore[union-attr]
        sock.send(b"\xc1garbage")
        sock.send(frame_message(np.ones((64, 64, 3), np.uint8), time.monotonic_ns()))
        sock.send(frame_message(np.ones((96, 96, 3), np.float32), time.monotonic_ns()))
        time.sleep(0.1)
        assert cam.read_latest().seq == seq  # type: ignore[union-attr]
        assert cam.dropped == 3
    finally:
        cam.close()


def test_stale_when_frames_stop(pub) -> None:
    sock, endpoint = pub
    cam = SimCamera(endpoint)
    try:
        publish_until_seen(sock, cam, frame_message(np.zeros((96, 96, 3), np.uint8),
                                                    time.monotonic_ns()))
        for _ in range(5):
            sock.send(frame_message(np.zeros((96, 96, 3), np.uint8), time.monotonic_ns()))
            time.sleep(0.01)
            assert not cam.is_stale(100.0)
        time.sleep(0.15)  # the stream stops
        assert cam.is_stale(100.0)
        assert cam.age_ms() > 100.0
    finally:
        cam.close()


def test_v4l2_missing_device_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CameraError, match=r"no-camera.*no such device"):
        V4L2Camera(str(tmp_path / "no-camera"))


def test_v4l2_non_camera_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "video9"
    fake.write_bytes(b"")
    with pytest.raises(CameraError, match="could not open it as a V4L2 device"):
        V4L2Camera(str(fake))
