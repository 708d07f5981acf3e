"""The follower's safety state machine and the last filter before the bus.

INIT -> HOLD <-> TRACK; any fault -> FAULT; estop -> ESTOP; only `reset` leaves FAULT/ESTOP.
Every command that reaches a bus passes `SafetyFilter.apply`: finite, and inside position,
velocity and acceleration limits (clamped and counted, never silently passed).
"""

from __future__ import annotations

import enum

import numpy as np


class Mode(enum.IntEnum):
    INIT = 0
    HOLD = 1
    TRACK = 2
    FAULT = 3
    ESTOP = 4


class NonFiniteCommand(Exception):
    pass


class SafetyMachine:
    """Mode transitions with the reason for the last fault; counters for the summary."""

    def __init__(self, storm_misses: int, storm_window: int) -> None:
        self.mode = Mode.INIT
        self.reason: str | None = None
        self.faults = 0
        self.estops = 0
        self._storm_misses = storm_misses
        self._miss_ring = np.zeros(storm_window, dtype=np.bool_)
        self._miss_i = 0
        self._miss_count = 0

    @property
    def latched(self) -> bool:
        return self.mode in (Mode.FAULT, Mode.ESTOP)

    def fault(self, reason: str) -> bool:
        """Enter FAULT; returns True when this call caused the transition."""
        if self.latched:
            return False
        self.mode, self.reason = Mode.FAULT, reason
        self.faults += 1
        return True

    def estop(self, reason: str) -> bool:
        if self.mode == Mode.ESTOP:
            return False
        self.mode, self.reason = Mode.ESTOP, reason
        self.estops += 1
        return True

    def reset(self) -> bool:
        """Leave FAULT/ESTOP for HOLD (the caller re-reads the motors first)."""
        if not self.latched:
            return False
        self.mode, self.reason = Mode.HOLD, None
        self._miss_ring[:] = False
        self._miss_count = 0
        return True

    def hold(self) -> None:
        if not self.latched:
            self.mode = Mode.HOLD

    def track(self) -> None:
        if self.mode == Mode.HOLD:
            self.mode = Mode.TRACK

    def account_deadline(self, missed: bool) -> bool:
        """Sliding-window miss counter; True when a storm (too many misses) is detected."""
        old = self._miss_ring[self._miss_i]
        self._miss_ring[self._miss_i] = missed
        self._miss_i = (self._miss_i + 1) % self._miss_ring.shape[0]
        self._miss_count += int(missed) - int(old)
        return self._miss_count >= self._storm_misses


class SafetyFilter:
    """Clamp a desired position command to position, velocity and acceleration limits."""

    def __init__(self, pos_min: np.ndarray, pos_max: np.ndarray, vel_max: np.ndarray,
                 acc_max: np.ndarray, dt: float) -> None:
        self.lo = np.asarray(pos_min, dtype=np.float64)
        self.hi = np.asarray(pos_max, dtype=np.float64)
        self.vmax = np.asarray(vel_max, dtype=np.float64)
        self.amax = np.asarray(acc_max, dtype=np.float64)
        self.dt = dt
        n = self.lo.shape[0]
        self.last = np.zeros(n)  # last command sent
        self.last_vel = np.zeros(n)
        self._v = np.zeros(n)
        self._lo_v = np.zeros(n)
        self._hi_v = np.zeros(n)
        self.clamped = 0

    def reset(self, q: np.ndarray) -> None:
        """The next command starts from the measured position, at rest (never a jump)."""
        np.clip(q, self.lo, self.hi, out=self.last)
        self.last_vel[:] = 0.0

    def apply(self, desired: np.ndarray, out: np.ndarray) -> bool:
        """Write the safe command into `out`; True if anything was clamped.

        Raises NonFiniteCommand, leaving `last` untouched, when `desired` is not finite.
        """
        if not np.isfinite(desired).all():
            raise NonFiniteCommand("non-finite command")
        v = self._v
        np.subtract(desired, self.last, out=v)
        v /= self.dt
        # velocity bound, then acceleration bound relative to the last command's velocity
        np.subtract(self.last_vel, self.amax * self.dt, out=self._lo_v)
        np.add(self.last_vel, self.amax * self.dt, out=self._hi_v)
        np.maximum(self._lo_v, -self.vmax, out=self._lo_v)
        np.minimum(self._hi_v, self.vmax, out=self._hi_v)
        clamped = bool(((v < self._lo_v) | (v > self._hi_v)).any())
        np.clip(v, self._lo_v, self._hi_v, out=v)
        np.multiply(v, self.dt, out=out)
        out += self.last
        over = (out < self.lo) | (out > self.hi)
        if over.any():
            clamped = True
            np.clip(out, self.lo, self.hi, out=out)
        np.subtract(out, self.last, out=self.last_vel)
        self.last_vel /= self.dt
        self.last[:] = out
        if clamped:
            self.clamped += 1
        return clamped
