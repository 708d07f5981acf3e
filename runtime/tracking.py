"""From the reference to a position command: plan evaluation, the learned residual, braking.

Shared by the real-time follower and by closed-loop evaluation in lockstep, so both run the
same code. The safety filter is applied by the caller, after this.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.reference import Plan, ReferenceGenerator


class ResidualEngine(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class Brake:
    """Decelerate each joint from (pos, vel) to rest at `decel`, then hold."""

    def __init__(self, n: int, decel: float) -> None:
        self.pos = np.zeros(n)
        self.vel = np.zeros(n)
        self.decel = decel
        self._dv = np.zeros(n)

    def start(self, pos: np.ndarray, vel: np.ndarray) -> None:
        self.pos[:] = pos
        self.vel[:] = vel

    def step(self, dt: float) -> np.ndarray:
        np.clip(self.vel, -self.decel * dt, self.decel * dt, out=self._dv)
        self.vel -= self._dv
        self.pos += self.vel * dt
        return self.pos


class Tracker:
    """Reference + look-ahead window + residual -> desired position command."""

    def __init__(self, n_joints: int, tick_dt: float, reference: ReferenceGenerator,
                 engine: ResidualEngine | None = None, lookahead: int = 8,
                 lookahead_dt: float = 0.02, residual_max: float = 0.05,
                 residual_filter_s: float = 0.05, hold_decel: float = 4.0) -> None:
        self.n = n_joints
        self.tick_dt = tick_dt
        self.reference = reference
        self.engine = engine
        self.use_residual = engine is not None
        self.residual_max = residual_max
        self.residual_filter_s = residual_filter_s
        self.brake = Brake(n_joints, hold_decel)
        self._offsets = np.concatenate(([tick_dt], (np.arange(lookahead) + 1.0) * lookahead_dt))
        self._times = np.zeros(lookahead + 1)
        self._pos = np.zeros((lookahead + 1, n_joints))
        self._vel = np.zeros((lookahead + 1, n_joints))
        self._ref = np.zeros((1, lookahead, n_joints), dtype=np.float32)
        self._q = np.zeros((1, n_joints), dtype=np.float32)
        self._dq = np.zeros((1, n_joints), dtype=np.float32)
        self._feeds = {"ref": self._ref, "q": self._q, "dq": self._dq}
        self.residual = np.zeros(n_joints)
        self.ref_now = np.zeros(n_joints)  # reference at the command time (for telemetry)
        self.ref_vel = np.zeros(n_joints)

    def start_hold(self, pos: np.ndarray, vel: np.ndarray) -> None:
        """Brake from the current command; the reference restarts from where the brake is."""
        self.brake.start(pos, vel)
        self.reference.clear()
        self.residual[:] = 0.0

    def hold_command(self) -> np.ndarray:
        pos = self.brake.step(self.tick_dt)
        self.ref_now[:] = pos
        self.ref_vel[:] = self.brake.vel
        return pos

    def add_plan(self, waypoints: np.ndarray, dt: float, t_obs: float, t_now: float) -> None:
        if not self.reference.has_plan:
            # Seed with the brake's position as a constant plan, already ended, so the first
            # real plan is blended in from where the arm is commanded rather than stepped to.
            hold = np.repeat(self.brake.pos[None, :], 2, axis=0)
            self.reference.add_plan(Plan(hold, 1.0, t_now - 2.0, t_now), t_now)
        self.reference.add_plan(Plan(waypoints, dt, t_obs, t_now), t_now)

    def track_command(self, t: float, q: np.ndarray, dq: np.ndarray, out: np.ndarray) -> None:
        """Desired command for time t + tick into `out` (before the safety filter)."""
        np.add(self._offsets, t, out=self._times)
        self.reference.evaluate(self._times, self._pos, self._vel)
        self.ref_now[:] = self._pos[0]
        self.ref_vel[:] = self._vel[0]
        out[:] = self._pos[0]
        if self.use_residual and self.engine is not None:
            self._ref[0] = self._pos[1:]
            self._q[0] = q
            self._dq[0] = dq
            r = self.engine.run(self._feeds)["residual"][0]
            # first-order low-pass: the network's tick-to-tick jitter must not turn into
            # acceleration spikes that the safety filter would clamp
            alpha = self.tick_dt / (self.residual_filter_s + self.tick_dt)
            self.residual += alpha * (np.clip(r, -self.residual_max, self.residual_max)
                                      - self.residual)
            out += self.residual
        # keep the brake in step so HOLD starts from the last tracked command
        self.brake.pos[:] = self._pos[0]
        self.brake.vel[:] = self._vel[0]
