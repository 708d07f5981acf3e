"""The follower's modes and the last filter before the bus.

INIT -> HOLD <-> TRACK; any fault -> FAULT; estop -> ESTOP; only `reset` leaves FAULT/ESTOP
(the transitions themselves live in runtime/follower/core.py, in one place). Every command that
reaches a bus passes `SafetyFilter.apply`: finite, and inside position, velocity and
acceleration limits (clamped and counted, never silently passed).
"""

from __future__ import annotations

import enum
import math

import numpy as np


class Mode(enum.IntEnum):
    INIT = 0
    HOLD = 1
    TRACK = 2
    FAULT = 3
    ESTOP = 4


LATCHED = (Mode.FAULT, Mode.ESTOP)


class NonFiniteCommand(Exception):
    pass


class SafetyFilter:
    """Clamp a desired position command to position, velocity and acceleration limits."""

    def __init__(self, pos_min: np.ndarray, pos_max: np.ndarray, vel_max: np.ndarray,
                 acc_max: np.ndarray, dt: float) -> None:
        self.lo = np.asarray(pos_min, dtype=np.float64)
        self.hi = np.asarray(pos_max, dtype=np.float64)
        self.vmax = np.asarray(vel_max, dtype=np.float64)
        amax = np.asarray(acc_max, dtype=np.float64)
        # Non-positive limits would invert the clip below (a "hold" driven to the limit):
        # the config refuses them; this is the last line.
        for name, v in (("velocity", self.vmax), ("acceleration", amax)):
            if not (np.isfinite(v).all() and (v > 0).all()):
                raise ValueError(f"{name} limits must be finite and > 0: {v.tolist()}")
        if not (np.isfinite(self.lo).all() and np.isfinite(self.hi).all()
                and (self.lo < self.hi).all()):
            raise ValueError("position limits must be finite with min < max")
        self.dt = dt
        self._inv_dt = 1.0 / dt
        self._adt = amax * dt  # largest velocity change per tick
        n = self.lo.shape[0]
        self.last = np.zeros(n)  # last command sent
        self.last_vel = np.zeros(n)
        self._v = np.zeros(n)
        self._vc = np.zeros(n)
        self._lo_v = np.zeros(n)
        self._hi_v = np.zeros(n)
        self._neg_vmax = -self.vmax
        self._ok = np.zeros(n, dtype=bool)
        self._over = np.zeros(n, dtype=bool)
        self.clamped = 0

    def reset(self, q: np.ndarray) -> None:
        """The next command starts from `q`, at rest (never a jump)."""
        np.clip(q, self.lo, self.hi, out=self.last)
        self.last_vel[:] = 0.0

    def apply(self, desired: np.ndarray, out: np.ndarray) -> bool:
        """Write the safe command into `out`; True if anything was clamped.

        Raises NonFiniteCommand, leaving `last` untouched, when `desired` is not finite.
        (Direct ufunc calls only: this runs every tick, and np.clip / .any() cost more in
        their Python wrappers than in their arithmetic.)
        """
        # the sum of finite commands is finite (an overflow to inf counts as non-finite:
        # no safe command is ~1e308 rad)
        if not math.isfinite(np.add.reduce(desired)):
            raise NonFiniteCommand("non-finite command")
        v, vc, lo, hi, moved = self._v, self._vc, self._lo_v, self._hi_v, self._over
        np.subtract(desired, self.last, out=v)
        v *= self._inv_dt
        # velocity bound, then acceleration bound relative to the last command's velocity
        np.subtract(self.last_vel, self._adt, out=lo)
        np.maximum(lo, self._neg_vmax, out=lo)
        np.add(self.last_vel, self._adt, out=hi)
        np.minimum(hi, self.vmax, out=hi)
        np.maximum(v, lo, out=vc)
        np.minimum(vc, hi, out=vc)
        np.not_equal(vc, v, out=moved)
        clamped = bool(np.logical_or.reduce(moved))
        np.multiply(vc, self.dt, out=out)
        out += self.last
        np.maximum(out, self.lo, out=v)  # v: free now, the position before its clip
        np.minimum(v, self.hi, out=v)
        np.not_equal(v, out, out=moved)
        if np.logical_or.reduce(moved):
            clamped = True
            out[:] = v
        np.subtract(out, self.last, out=self.last_vel)
        self.last_vel *= self._inv_dt
        self.last[:] = out
        if clamped:
            self.clamped += 1
        return clamped
