"""The MIT-mode bit layout (Ben Katz's mini-cheetah motor protocol) shared by every dialect.

Each float is mapped linearly onto an unsigned field over the motor model's range, big-endian:

    command (8 bytes):  p16 | v12 kp12 | kd12 t12          p in [-p_max, p_max], v in
    state   (5 bytes):  p16 | v12 t12                      [-v_max, v_max], t in [-t_max,
                                                           t_max], kp in [0, kp_max], kd in
                                                           [0, kd_max]

Wire rounding: **truncation**, `int((x - lo) * (2**bits - 1) / (hi - lo))` after clamping,
exactly as the motors' own firmware (Katz's motorcontrol `float_to_uint`, Damiao, CubeMars,
MyActuator) and every published host library computes it. Rounding to nearest would halve
the quantisation error of a command, but a motor decodes the code as its lower edge, so the
firmware's convention is the one that makes host and motor agree code for code, and the
conformance tests can compare frames byte for byte with independent implementations.
The top of a range maps to the top code even where the float arithmetic would fall a hair
short of it (as motor-python does). Decoding is `u * (hi - lo) / (2**bits - 1) + lo`. NaN
never reaches the wire (ValueError); out-of-range values clamp (the driver refuses them
earlier with CommandError).
"""

from __future__ import annotations

from typing import Any

import numpy as np

COMMAND_DLC = 8
_U16 = (1 << 16) - 1
_U12 = (1 << 12) - 1


class MitRanges:
    """Field ranges of one motor model (duck-types runtime.config.MitMotorModel)."""

    __slots__ = ("kd_max", "kp_max", "p_max", "t_max", "v_max")

    def __init__(
        self, p_max: float, v_max: float, t_max: float, kp_max: float = 500.0, kd_max: float = 5.0
    ) -> None:
        for name, value in (("p_max", p_max), ("v_max", v_max), ("t_max", t_max),
                            ("kp_max", kp_max), ("kd_max", kd_max)):
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"MIT motor model: {name} must be finite and > 0, got {value}")
        self.p_max, self.v_max, self.t_max = float(p_max), float(v_max), float(t_max)
        self.kp_max, self.kd_max = float(kp_max), float(kd_max)

    @classmethod
    def of(cls, model: Any) -> MitRanges:
        """From any object with p_max, v_max, t_max, kp_max, kd_max attributes."""
        if isinstance(model, MitRanges):
            return model
        return cls(model.p_max, model.v_max, model.t_max, model.kp_max, model.kd_max)

    def __repr__(self) -> str:
        return (f"MitRanges(p_max={self.p_max}, v_max={self.v_max}, t_max={self.t_max},"
                f" kp_max={self.kp_max}, kd_max={self.kd_max})")


def float_to_uint(x: float, lo: float, hi: float, bits: int) -> int:
    """Clamp x to [lo, hi] and map it onto 0 .. 2**bits - 1, truncating (the firmware's way)."""
    if x != x:  # NaN has no place on the wire; +-inf clamps like any out-of-range value
        raise ValueError("MIT field cannot encode NaN")
    if x >= hi:  # (hi - lo) * top / (hi - lo) can land a hair under top (e.g. p_max 12.56)
        return (1 << bits) - 1
    return int((max(x, lo) - lo) * ((1 << bits) - 1) / (hi - lo))


def uint_to_float(u: int, lo: float, hi: float, bits: int) -> float:
    return u * (hi - lo) / ((1 << bits) - 1) + lo


def pack_command_into(
    buf: bytearray, p: float, v: float, kp: float, kd: float, t: float, r: MitRanges
) -> None:
    """Write the 8-byte command into `buf` in place (the tick path allocates no frames)."""
    pi = float_to_uint(p, -r.p_max, r.p_max, 16)
    vi = float_to_uint(v, -r.v_max, r.v_max, 12)
    kpi = float_to_uint(kp, 0.0, r.kp_max, 12)
    kdi = float_to_uint(kd, 0.0, r.kd_max, 12)
    ti = float_to_uint(t, -r.t_max, r.t_max, 12)
    buf[0], buf[1] = pi >> 8, pi & 0xFF
    buf[2], buf[3], buf[4] = vi >> 4, ((vi & 0xF) << 4) | (kpi >> 8), kpi & 0xFF
    buf[5], buf[6], buf[7] = kdi >> 4, ((kdi & 0xF) << 4) | (ti >> 8), ti & 0xFF


def pack_command(p: float, v: float, kp: float, kd: float, t: float, r: MitRanges) -> bytes:
    buf = bytearray(COMMAND_DLC)
    pack_command_into(buf, p, v, kp, kd, t, r)
    return bytes(buf)


def unpack_command(
    data: bytes | bytearray, r: MitRanges
) -> tuple[float, float, float, float, float]:
    """(p, v, kp, kd, t) from an 8-byte command frame."""
    if len(data) != COMMAND_DLC:
        raise ValueError(f"MIT command has {COMMAND_DLC} bytes, got {len(data)}")
    pi = (data[0] << 8) | data[1]
    vi = (data[2] << 4) | (data[3] >> 4)
    kpi = ((data[3] & 0xF) << 8) | data[4]
    kdi = (data[5] << 4) | (data[6] >> 4)
    ti = ((data[6] & 0xF) << 8) | data[7]
    return (uint_to_float(pi, -r.p_max, r.p_max, 16), uint_to_float(vi, -r.v_max, r.v_max, 12),
            uint_to_float(kpi, 0.0, r.kp_max, 12), uint_to_float(kdi, 0.0, r.kd_max, 12),
            uint_to_float(ti, -r.t_max, r.t_max, 12))


def pack_state_into(buf: bytearray, at: int, p: float, v: float, t: float, r: MitRanges) -> None:
    """The 5-byte state (p16 v12 t12) at buf[at:at+5]."""
    pi = float_to_uint(p, -r.p_max, r.p_max, 16)
    vi = float_to_uint(v, -r.v_max, r.v_max, 12)
    ti = float_to_uint(t, -r.t_max, r.t_max, 12)
    buf[at], buf[at + 1], buf[at + 2] = pi >> 8, pi & 0xFF, vi >> 4
    buf[at + 3], buf[at + 4] = ((vi & 0xF) << 4) | (ti >> 8), ti & 0xFF


def unpack_state(data: bytes | bytearray, at: int, r: MitRanges) -> tuple[float, float, float]:
    """(p, v, t) from the 5-byte state at data[at:at+5]."""
    pi = (data[at] << 8) | data[at + 1]
    vi = (data[at + 2] << 4) | (data[at + 3] >> 4)
    ti = ((data[at + 3] & 0xF) << 8) | data[at + 4]
    return (uint_to_float(pi, -r.p_max, r.p_max, 16), uint_to_float(vi, -r.v_max, r.v_max, 12),
            uint_to_float(ti, -r.t_max, r.t_max, 12))
