"""From the reference to a position command: plan evaluation, the learned residual, braking.

Part of the follower core (runtime/core.py): the robot, the lockstep eval and the bench all run
this code. The safety filter is applied by the core, after this. Nothing here allocates per
tick: every array is preallocated and every operation writes into it.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from runtime.reference import Plan, ReferenceGenerator


class ResidualModel(Protocol):
    """The follower network behind the contract: (reference window [L, D], q [D], dq [D]) ->
    residual [D] in rad (a buffer the model owns, valid until its next call)."""

    lookahead: int
    lookahead_dt: float

    def residual(self, ref: np.ndarray, q: np.ndarray, dq: np.ndarray) -> np.ndarray: ...


class Brake:
    """Decelerate each joint from (pos, vel) to rest at `decel`, then hold."""

    def __init__(self, n: int, decel: float) -> None:
        self.pos = np.zeros(n)
        self.vel = np.zeros(n)
        self.decel = decel
        self._dv = np.zeros(n)
        self._dx = np.zeros(n)

    def start(self, pos: np.ndarray, vel: np.ndarray) -> None:
        self.pos[:] = pos
        self.vel[:] = vel

    def step(self, dt: float) -> np.ndarray:
        lim = self.decel * dt
        np.clip(self.vel, -lim, lim, out=self._dv)
        self.vel -= self._dv
        np.multiply(self.vel, dt, out=self._dx)
        self.pos += self._dx
        return self.pos


class Tracker:
    """Reference + look-ahead window + residual -> desired position command."""

    def __init__(self, n_joints: int, tick_dt: float, reference: ReferenceGenerator,
                 model: ResidualModel | None = None, residual_max: float = 0.05,
                 residual_filter_s: float = 0.05, hold_decel: float = 4.0) -> None:
        self.n = n_joints
        self.tick_dt = tick_dt
        self.reference = reference
        self.model = model
        self.use_residual = model is not None
        self.residual_max = residual_max
        self.residual_filter_s = residual_filter_s
        self.brake = Brake(n_joints, hold_decel)
        look, look_dt = (model.lookahead, model.lookahead_dt) if model else (0, 0.0)
        self._offsets = np.concatenate(([tick_dt], (np.arange(look) + 1.0) * look_dt))
        self._times = np.zeros(look + 1)
        self._pos = np.zeros((look + 1, n_joints))
        self._vel = np.zeros((look + 1, n_joints))
        self._now_pos, self._now_vel, self._window = self._pos[0], self._vel[0], self._pos[1:]
        self._r = np.zeros(n_joints)
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

    def add_plan(self, plan: Plan, t_now: float) -> None:
        if not self.reference.has_plan:
            # Seed with the brake's position as a constant plan, already ended, so the first
            # real plan is blended in from where the arm is commanded rather than stepped to.
            hold = np.repeat(self.brake.pos[None, :], 2, axis=0)
            self.reference.add_plan(Plan(hold, 1.0, t_now - 2.0, t_now), t_now)
        self.reference.add_plan(plan, t_now)

    def track_command(self, t: float, q: np.ndarray, dq: np.ndarray, out: np.ndarray) -> None:
        """Desired command for time t + tick into `out` (before the safety filter)."""
        np.add(self._offsets, t, out=self._times)
        self.reference.evaluate(self._times, self._pos, self._vel)
        self.ref_now[:] = self._now_pos
        self.ref_vel[:] = self._now_vel
        out[:] = self._now_pos
        if self.use_residual and self.model is not None:
            r = self._r
            np.clip(self.model.residual(self._window, q, dq), -self.residual_max,
                    self.residual_max, out=r)
            # first-order low-pass: the network's tick-to-tick jitter must not turn into
            # acceleration spikes that the safety filter would clamp
            r -= self.residual
            r *= self.tick_dt / (self.residual_filter_s + self.tick_dt)
            self.residual += r
            out += self.residual
        # keep the brake in step so HOLD starts from the last tracked command
        self.brake.pos[:] = self._now_pos
        self.brake.vel[:] = self._now_vel
