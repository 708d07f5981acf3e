"""Wire messages: one msgpack map per ZeroMQ frame, versioned and validated.

Every message has `v` (schema version), `type`, `seq` (per-sender counter) and `t_ns`
(send time, monotonic). Arrays travel as {"dtype", "shape", "data"} and decode zero-copy.
A receiver rejects — never crashes on — an unknown version, a wrong type, a wrong shape or
non-finite numbers: `decode` raises `MessageError`, the caller counts and drops.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import numpy as np

VERSION = 1
TYPES = frozenset({"state", "plan", "telemetry", "request", "reply", "task", "frame", "episode"})
_ARRAY_DTYPES = frozenset({"<f4", "<f8", "|u1", "<i8", "<i4", "<u4"})


class MessageError(ValueError):
    """A message that is dropped: the reason is in the text; `kind` is a short counter key."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def pack_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(obj: Any, field: str) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"dtype", "shape", "data"}:
        raise MessageError("schema", f"{field}: not an array object")
    dtype, shape, data = obj["dtype"], obj["shape"], obj["data"]
    if dtype not in _ARRAY_DTYPES:
        raise MessageError("schema", f"{field}: dtype {dtype!r} not allowed")
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise MessageError("schema", f"{field}: bad shape {shape!r}")
    if not isinstance(data, bytes):
        raise MessageError("schema", f"{field}: data is not bytes")
    dt = np.dtype(dtype)
    count = int(np.prod(shape)) if shape else 1
    if count * dt.itemsize != len(data):
        raise MessageError("shape", f"{field}: {len(data)} bytes do not fill shape {shape}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


class Encoder:
    """Per-sender encoder: stamps version, type, seq and send time."""

    def __init__(self) -> None:
        self.seq = 0
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, type_: str, body: dict[str, Any], t_ns: int | None = None) -> bytes:
        self.seq += 1
        msg = {"v": VERSION, "type": type_, "seq": self.seq,
               "t_ns": time.monotonic_ns() if t_ns is None else t_ns}
        msg.update(body)
        return self._packer.pack(msg)


def decode(frame: bytes, expect: str | None = None) -> dict[str, Any]:
    """Decode one frame into a dict; raise MessageError on anything malformed."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError("malformed", f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict):
        raise MessageError("malformed", "message is not a map")
    if msg.get("v") != VERSION:
        raise MessageError("version", f"unsupported version {msg.get('v')!r}")
    type_ = msg.get("type")
    if type_ not in TYPES or (expect is not None and type_ != expect):
        raise MessageError("type", f"unexpected type {type_!r}")
    if not isinstance(msg.get("seq"), int) or not isinstance(msg.get("t_ns"), int):
        raise MessageError("schema", "seq and t_ns must be integers")
    return msg


def _finite(a: np.ndarray, field: str) -> np.ndarray:
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise MessageError("nonfinite", f"{field}: non-finite values")
    return a


def decode_plan(frame: bytes, n_joints: int) -> tuple[dict[str, Any], np.ndarray]:
    """A plan: waypoints [H, D] float32, dt_s > 0, t_obs_ns int, latency_ms float."""
    msg = decode(frame, "plan")
    w = _finite(unpack_array(msg.get("waypoints"), "waypoints"), "waypoints")
    if w.ndim != 2 or w.shape[1] != n_joints or w.shape[0] < 2:
        raise MessageError("shape", f"waypoints shape {list(w.shape)}, expected [H>=2, {n_joints}]")
    dt = msg.get("dt_s")
    if not isinstance(dt, float) or not (0.0 < dt < 10.0):
        raise MessageError("schema", f"dt_s {dt!r} out of range")
    if not isinstance(msg.get("t_obs_ns"), int):
        raise MessageError("schema", "t_obs_ns must be an integer")
    return msg, w


def decode_state(frame: bytes, n_joints: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    msg = decode(frame, "state")
    q = _finite(unpack_array(msg.get("q"), "q"), "q")
    dq = _finite(unpack_array(msg.get("dq"), "dq"), "dq")
    if q.shape != (n_joints,) or dq.shape != (n_joints,):
        raise MessageError("shape", f"state shape {list(q.shape)}, expected [{n_joints}]")
    return msg, q, dq
