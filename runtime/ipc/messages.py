"""Wire messages: one msgpack map per ZeroMQ frame, versioned and validated.

Every message has `v` (schema version), `type`, `seq` (per-sender counter) and `t_ns`
(send time, monotonic). Arrays travel as {"dtype", "shape", "data"} and decode zero-copy.

Everything here treats its input as hostile: `decode` and the typed decoders raise only
`MessageError` (with a short `kind` for the drop counters), whatever the bytes are. Sizes are
computed with Python ints (no overflow), array rank and element count are capped, booleans are
not integers, and a zero-size array cannot carry huge dimensions. Semantic checks that need
the receiver's state (joint count, clock, limits) belong to the receiver (follower/core.py for
plans).
"""

from __future__ import annotations

import math
import struct
import time
from collections.abc import Mapping
from typing import Any, TypeGuard

import msgpack
import numpy as np

VERSION = 1
TYPES = frozenset({"state", "plan", "telemetry", "request", "reply", "task", "frame", "episode",
                   "observation"})
_ARRAY_DTYPES = frozenset({"<f4", "<f8", "|u1", "<i8", "<i4", "<u4"})
MAX_RANK = 4
MAX_ELEMENTS = 1 << 24  # 16 M: a 1080p RGB frame is 6.2 M
_INT64_MAX = (1 << 63) - 1


class MessageError(ValueError):
    """A message that is dropped: the reason is in the text; `kind` is a short counter key."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def is_int(x: object) -> TypeGuard[int]:
    """An integer on the wire: not a bool (True == 1 in Python), inside int64."""
    return type(x) is int and -_INT64_MAX - 1 <= x <= _INT64_MAX


def is_real(x: object) -> TypeGuard[float]:
    """A finite float or int (not a bool)."""
    return (type(x) is float and math.isfinite(x)) or is_int(x)


def pack_array(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a)
    return {"dtype": a.dtype.str, "shape": list(a.shape), "data": a.tobytes()}


def unpack_array(obj: Any, field: str) -> np.ndarray:
    """A read-only view on the message's bytes; MessageError on anything malformed."""
    if not isinstance(obj, dict) or len(obj) != 3:
        raise MessageError("schema", f"{field}: not an array object")
    dtype, shape, data = obj.get("dtype"), obj.get("shape"), obj.get("data")
    if type(dtype) is not str or dtype not in _ARRAY_DTYPES:
        raise MessageError("schema", f"{field}: dtype {dtype!r} not allowed")
    if type(shape) is not list or len(shape) > MAX_RANK:
        raise MessageError("schema", f"{field}: shape must be a list of at most {MAX_RANK} dims")
    if not all(type(s) is int and 0 <= s <= MAX_ELEMENTS for s in shape):
        raise MessageError("schema", f"{field}: bad shape {shape!r}")
    # The product of the non-zero dims is capped too: [2**20, 2**20, 0] holds no data but
    # would still expand to 2**40 nested lists in `.tolist()`.
    if math.prod(s or 1 for s in shape) > MAX_ELEMENTS:
        raise MessageError("schema", f"{field}: shape {shape} exceeds {MAX_ELEMENTS} elements")
    if type(data) is not bytes:
        raise MessageError("schema", f"{field}: data is not bytes")
    dt = np.dtype(dtype)
    if math.prod(shape) * dt.itemsize != len(data):
        raise MessageError("shape", f"{field}: {len(data)} bytes do not fill shape {shape}")
    return np.frombuffer(data, dtype=dt).reshape(shape)


def finite_array(obj: Any, field: str) -> np.ndarray:
    a = unpack_array(obj, field)
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        raise MessageError("nonfinite", f"{field}: non-finite values")
    return a


class Encoder:
    """Per-sender encoder: stamps version, type, seq and send time."""

    def __init__(self) -> None:
        self.seq = 0
        self._packer = msgpack.Packer(use_bin_type=True)

    def encode(self, type_: str, body: Mapping[str, Any], t_ns: int | None = None) -> bytes:
        self.seq += 1
        msg = {"v": VERSION, "type": type_, "seq": self.seq,
               "t_ns": time.monotonic_ns() if t_ns is None else t_ns}
        msg.update(body)
        return self._packer.pack(msg)


def decode(frame: bytes, expect: str | None = None) -> dict[str, Any]:
    """Decode one frame into a dict; raise MessageError (only) on anything malformed."""
    try:
        msg = msgpack.unpackb(frame, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise MessageError("malformed", f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(msg, dict):
        raise MessageError("malformed", "message is not a map")
    v = msg.get("v")
    if not is_int(v) or v != VERSION:
        raise MessageError("version", f"unsupported version {v!r}")
    type_ = msg.get("type")
    if type(type_) is not str or type_ not in TYPES or (expect is not None and type_ != expect):
        raise MessageError("type", f"unexpected type {type_!r}")
    seq, t_ns = msg.get("seq"), msg.get("t_ns")
    if not (is_int(seq) and isinstance(t_ns, int) and is_int(t_ns) and t_ns >= 0):
        raise MessageError("schema", "seq and t_ns must be integers (t_ns >= 0)")
    return msg


def decode_plan(frame: bytes) -> tuple[dict[str, Any], np.ndarray]:
    """A plan's structure: waypoints [H, D] finite, dt_s and t_obs_ns numbers. Whether the
    plan is acceptable (joints, horizon, dt range, age, limits) is the follower core's call."""
    msg = decode(frame, "plan")
    w = finite_array(msg.get("waypoints"), "waypoints")
    if w.ndim != 2:
        raise MessageError("shape", f"waypoints shape {list(w.shape)}, expected [H, D]")
    if not is_real(msg.get("dt_s")):
        raise MessageError("schema", f"dt_s {msg.get('dt_s')!r} is not a finite number")
    if not is_int(msg.get("t_obs_ns")):
        raise MessageError("schema", "t_obs_ns must be an integer")
    return msg, w


def decode_state(frame: bytes, n_joints: int) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """A joint state: q, dq [n_joints] finite; `t_read_ns` an integer (the read's time)."""
    msg = decode(frame, "state")
    q = finite_array(msg.get("q"), "q")
    dq = finite_array(msg.get("dq"), "dq")
    if q.shape != (n_joints,) or dq.shape != (n_joints,):
        raise MessageError("shape", f"state shape {list(q.shape)}, expected [{n_joints}]")
    if not is_int(msg.get("t_read_ns")) or msg["t_read_ns"] < 0:
        raise MessageError("schema", "t_read_ns must be a non-negative integer")
    return msg, q, dq


class FrameTemplate:
    """A message whose layout never changes (fixed keys, fixed-size arrays), encoded once.

    The real-time loop fills it in place: integers are always encoded as uint64 (valid
    msgpack, if not minimal) and array bytes are numpy views into the frame, so publishing a
    state costs no allocation and no encoding.
    """

    _U64 = struct.Struct(">Q")

    def __init__(self, type_: str, ints: tuple[str, ...], arrays: dict[str, np.ndarray],
                 fixed: dict[str, Any]) -> None:
        marks = {name: (1 << 63) + 0x5EED0000 + i for i, name in enumerate(("seq", "t_ns", *ints))}
        body: dict[str, Any] = {"v": VERSION, "type": type_, **marks, **fixed}
        pads = {}
        for i, (name, like) in enumerate(arrays.items()):
            pad = bytes([0xA5, i]) * (like.nbytes // 2) + b"\xa5" * (like.nbytes % 2)
            pads[name] = pad
            body[name] = {"dtype": like.dtype.str, "shape": list(like.shape), "data": pad}
        self.buf = bytearray(msgpack.packb(body, use_bin_type=True))
        self._int_at = {}
        for name, mark in marks.items():
            self._int_at[name] = self.buf.index(b"\xcf" + self._U64.pack(mark)) + 1
        self.arrays: dict[str, np.ndarray] = {}
        for name, like in arrays.items():
            at = self.buf.index(pads[name])
            self.arrays[name] = np.frombuffer(self.buf, like.dtype, like.size, at
                                              ).reshape(like.shape)
        self.seq = 0

    def set_int(self, name: str, value: int) -> None:
        self._U64.pack_into(self.buf, self._int_at[name], value)

    def stamp(self, t_ns: int) -> bytearray:
        """Next seq, send time `t_ns`; returns the frame (valid until the next fill)."""
        self.seq += 1
        self._U64.pack_into(self.buf, self._int_at["seq"], self.seq)
        self._U64.pack_into(self.buf, self._int_at["t_ns"], t_ns)
        return self.buf
