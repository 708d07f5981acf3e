"""Excitation trajectories for identifying a robot's servos (`duet identify`), and the plan
source that sends them through the robot's own path (plan socket, follower, bus).

What a model-free follower needs to be fitted from (runtime/follower/identification.py)
decides the shape:
- *sweeps*: a sum of sines per joint with incommensurate frequencies around the start pose,
  so velocity and acceleration take many values and signs at many poses (gain, delay, viscous
  and Coulomb friction);
- *poses*: smooth moves between random poses of the box with holds, so the arm rests under
  gravity at many configurations (the gravity terms, and the steady state a follower holds).

Everything stays inside a joint-space box (the limits shrunk by a margin, intersected with the
span the operator allows around the start pose) and under a fraction of each joint's velocity
limit; every segment starts and ends at rest at the start pose, so a phase can be stopped
between segments and nothing jumps when the trajectory begins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from runtime.planner.shell import PlannerShell, PlanSource

GRID_HZ = 200.0  # the trajectory is tabulated on this grid and interpolated linearly
RAMP_S = 2.0  # fade-in/out of a sweep and duration of a move between poses
HOLD_S = 1.2  # rest at each pose (the servo settles within ~0.3 s; the rest is data)


@dataclass(frozen=True)
class Box:
    """Where the excitation may take each joint (rad) and how fast (rad/s)."""

    lo: np.ndarray
    hi: np.ndarray
    velocity: np.ndarray

    @classmethod
    def around(cls, center: np.ndarray, span: float, position_min: Sequence[float],
               position_max: Sequence[float], velocity_max: Sequence[float],
               speed: float, margin: float = 0.1) -> Box:
        """The limits shrunk by `margin` (rad), within `span` (rad) of `center`, at `speed`
        (a fraction of each joint's velocity limit). A center outside the shrunk limits is
        clipped into them (the first move brings the arm inside)."""
        lo = np.asarray(position_min, dtype=float) + margin
        hi = np.asarray(position_max, dtype=float) - margin
        if (hi <= lo).any():
            bad = int(np.argmax(hi <= lo))
            raise ValueError(f"joint {bad}: range narrower than twice the margin {margin} rad")
        c = np.clip(center, lo, hi)
        return cls(np.maximum(lo, c - span), np.minimum(hi, c + span),
                   np.asarray(velocity_max, dtype=float) * speed)


class Excitation:
    """A tabulated joint trajectory q(t), t in [0, duration]: sweeps, then poses."""

    def __init__(self, start: np.ndarray, box: Box, sweep_s: float, poses: int,
                 seed: int = 0, rate: float = 1.0) -> None:
        """`rate` scales every frequency (the slow phase runs at a fraction of it)."""
        self.start = np.clip(np.asarray(start, dtype=float), box.lo, box.hi)
        self.box = box
        rng = np.random.default_rng(seed)
        parts = [self._sweep(rng, sweep_s, rate)] if sweep_s > 0 else []
        parts += [self._poses(rng, poses, rate)] if poses > 0 else []
        self.q = np.concatenate(parts) if parts else self.start[None, :].copy()
        self.duration = (self.q.shape[0] - 1) / GRID_HZ
        self._t = np.arange(self.q.shape[0]) / GRID_HZ

    def _sweep(self, rng: np.random.Generator, seconds: float, rate: float) -> np.ndarray:
        n = self.start.shape[0]
        t = np.arange(round(seconds * GRID_HZ) + 1) / GRID_HZ
        # three incommensurate frequencies per joint, 0.1-0.6 Hz at full rate
        freqs = rate * rng.uniform(0.1, 0.6, size=(n, 3))
        phases = rng.uniform(0, 2 * math.pi, size=(n, 3))
        wave = np.sin(2 * math.pi * freqs[:, :, None] * t + phases[:, :, None]).sum(axis=1).T
        wave -= wave[0]  # starts at the start pose
        env = np.clip(np.minimum(t, t[-1] - t) / RAMP_S, 0.0, 1.0)
        env = 0.5 - 0.5 * np.cos(math.pi * env)  # raised cosine: starts and ends at rest
        wave *= env[:, None]
        # scale each joint into its box and under its speed
        room = np.minimum(self.box.hi - self.start, self.start - self.box.lo)
        peak = np.abs(wave).max(axis=0)
        vel = np.abs(np.diff(wave, axis=0)).max(axis=0) * GRID_HZ
        scale = np.minimum(room / np.maximum(peak, 1e-9), self.box.velocity / np.maximum(vel, 1e-9))
        return self.start + wave * scale

    def _poses(self, rng: np.random.Generator, count: int, rate: float) -> np.ndarray:
        targets = rng.uniform(self.box.lo, self.box.hi, size=(count, self.start.shape[0]))
        path = [self.start[None, :]]
        here = self.start
        for target in [*targets, self.start]:
            path.append(self._move(here, target, rate))
            path.append(np.repeat(target[None, :], round(HOLD_S * GRID_HZ), axis=0))
            here = target
        return np.concatenate(path)

    def _move(self, a: np.ndarray, b: np.ndarray, rate: float) -> np.ndarray:
        """Minimum-jerk move a -> b, long enough for every joint's speed (peak 1.875 x mean)."""
        need = float(np.max(np.abs(b - a) * 1.875 / self.box.velocity))
        seconds = max(RAMP_S / rate, need)
        s = np.arange(1, round(seconds * GRID_HZ) + 1) / round(seconds * GRID_HZ)
        blend = s**3 * (10 - 15 * s + 6 * s * s)
        return a + blend[:, None] * (b - a)

    def sample(self, t: np.ndarray) -> np.ndarray:
        """q at times t [K] (s from the start; held at the ends) -> [K, n]."""
        t = np.clip(t, 0.0, self.duration)
        return np.stack([np.interp(t, self._t, self.q[:, j])
                         for j in range(self.q.shape[1])], axis=1)


class ExcitationSource(PlanSource):
    """Plans that follow an excitation built around the first measured pose (`make(q0)`);
    `done` once the plan reaching its end (at rest at that pose) has been sent."""

    needs_instruction = False

    def __init__(self, make: Callable[[np.ndarray], Excitation], horizon: int, dt_s: float
                 ) -> None:
        self.make = make
        self.excitation: Excitation | None = None
        self.horizon, self.dt_s = horizon, dt_s
        self.t_start_ns: int | None = None
        self.done = False
        self._steps = (np.arange(horizon) + 1.0) * dt_s

    def camera_names(self) -> Sequence[str]:
        return ()

    def check_instruction(self, text: str) -> None:
        """Identification takes no instruction."""

    def cycle(self, shell: PlannerShell) -> None:
        got = shell.observe()
        if got is None or self.done:
            return
        _, t_obs = got
        if self.excitation is None or self.t_start_ns is None:
            self.excitation = self.make(shell.history.latest("q").astype(float))
            self.t_start_ns = t_obs
        t = (t_obs - self.t_start_ns) / 1e9
        shell.publish(self.excitation.sample(t + self._steps), self.dt_s, t_obs, None)
        self.done = t >= self.excitation.duration
