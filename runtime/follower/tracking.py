"""From the reference to a position command: plan evaluation, the learned residual, braking.

Part of the follower core (follower/core.py): the robot, the lockstep eval and the bench all run
this code. The safety filter is applied by the core, after this.

The reference is sampled once per plan onto the tick grid (`ReferenceTable`): position and
velocity at every tick for the next `TABLE_S` seconds plus the look-ahead span. A new plan's
table is prepared beside the one in use when the plan arrives (between ticks) and swapped in
by the tick that takes the plan; a table about to run out is refilled in the tick's slack.
So a tick reads one row, and the follower model's look-ahead window is a strided view of the
same table: a handful of array operations and no allocation, whatever the chunk strategy.
"""

from __future__ import annotations

import math
from typing import Protocol

import numpy as np

from runtime.follower.reference import ReferenceGenerator
from runtime.model.plan import Plan

TABLE_S = 0.5  # seconds of reference per table (refilled in the slack when it runs low)
REFILL_S = 0.1  # refill when less than this is left


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
        np.minimum(self.vel, lim, out=self._dv)
        np.maximum(self._dv, -lim, out=self._dv)
        self.vel -= self._dv
        np.multiply(self.vel, dt, out=self._dx)
        self.pos += self._dx
        return self.pos


class ReferenceTable:
    """A reference sampled at t0 + i * tick, i < rows."""

    def __init__(self, n: int, tick: float, rows: int) -> None:
        self.tick = tick
        self.t0 = 0.0
        self.valid = 0  # rows filled (0: empty)
        self._steps = np.arange(rows, dtype=np.float64) * tick
        self.times = np.zeros(rows)
        self.pos = np.zeros((rows, n))
        self.vel = np.zeros((rows, n))

    def fill(self, reference: ReferenceGenerator, t0: float) -> None:
        self.t0 = t0
        np.add(self._steps, t0, out=self.times)
        reference.evaluate(self.times, self.pos, self.vel)
        self.valid = self.times.shape[0]

    def row(self, t: float) -> int:
        """The row of the tick at t (-1 before the table)."""
        return round((t - self.t0) / self.tick) if self.valid else -1


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
        stride = look_dt / tick_dt if look else 1.0
        if look and abs(stride - round(stride)) > 1e-6:
            raise ValueError(f"the follower model's look-ahead spacing {look_dt * 1e3:g} ms is "
                             f"not a whole number of {tick_dt * 1e3:g} ms ticks: choose "
                             "follower.hz so that it is")
        self._stride = max(1, round(stride))
        # rows after the tick's own that a tick reads: the command (one tick on) and the
        # window (t + k * look_dt, k = 1..look)
        self._span = max(1, look * self._stride)
        rows = math.ceil(TABLE_S / tick_dt) + self._span + 2
        self._table = ReferenceTable(n_joints, tick_dt, rows)
        self._spare = ReferenceTable(n_joints, tick_dt, rows)
        self._prepared: tuple[ReferenceGenerator, float] | None = None
        self._r = np.zeros(n_joints)
        self.residual = np.zeros(n_joints)
        self.ref_now = np.zeros(n_joints)  # reference at the command time (for telemetry)
        self.ref_vel = np.zeros(n_joints)

    # ------------------------------------------------------------------ plans
    def start_hold(self, pos: np.ndarray, vel: np.ndarray) -> None:
        """Brake from the current command; the reference restarts from where the brake is."""
        self.brake.start(pos, vel)
        self.reference.clear()
        self._table.valid = 0
        self._prepared = None
        self.residual[:] = 0.0

    def hold_command(self) -> np.ndarray:
        pos = self.brake.step(self.tick_dt)
        self.ref_now[:] = pos
        self.ref_vel[:] = self.brake.vel
        return pos

    def prepare(self, plan: Plan, t_take: float) -> None:
        """Outside the tick: the reference as it will be once `plan` is taken at `t_take`
        (the next tick), sampled into the spare table."""
        ref = self.reference.copy()
        if not ref.has_plan:
            # Seed with the brake's position as a constant plan, already ended, so the first
            # real plan is blended in from where the arm is commanded rather than stepped to.
            hold = np.repeat(self.brake.pos[None, :], 2, axis=0)
            ref.add_plan(Plan(hold, 1.0, t_take - 2.0, t_take), t_take)
        ref.add_plan(plan, t_take)
        self._spare.fill(ref, t_take)
        self._prepared = (ref, t_take)

    def take_prepared(self) -> bool:
        """In the tick: the prepared reference becomes the one in use (a pointer swap)."""
        if self._prepared is None:
            return False
        self.reference = self._prepared[0]
        self._table, self._spare = self._spare, self._table
        self._prepared = None
        return True

    def add_plan(self, plan: Plan, t_now: float) -> None:
        """Prepare and take at once (tests and studies that have no slack to use)."""
        self.prepare(plan, t_now)
        self.take_prepared()

    def refill(self, t_next: float) -> bool:
        """In the slack: refill a table that will run out within REFILL_S (a long chunk, or a
        broker's queued plan that takes effect later). True when it did."""
        table = self._table
        if not table.valid or not self.reference.has_plan or self._prepared is not None:
            return False
        left = table.t0 + (table.valid - 1 - self._span) * table.tick - t_next
        if left > REFILL_S or t_next >= self.reference.t_end:
            return False
        self._spare.fill(self.reference, t_next)
        self._table, self._spare = self._spare, self._table
        return True

    # ------------------------------------------------------------------ the tick
    def track_command(self, t: float, q: np.ndarray, dq: np.ndarray, out: np.ndarray) -> None:
        """Desired command for the tick at t (before the safety filter) into `out`."""
        table = self._table
        j = table.row(t)
        if j < 0 or j + self._span >= table.valid:  # no slack came to refill: do it now
            table.fill(self.reference, t)
            j = 0
        now = table.pos[j + 1]  # the command is for the end of this tick
        self.ref_now[:] = now
        self.ref_vel[:] = table.vel[j + 1]
        out[:] = now
        if self.use_residual and self.model is not None:
            window = table.pos[j + self._stride: j + self._span + 1: self._stride]
            r = self._r
            np.minimum(self.model.residual(window, q, dq), self.residual_max, out=r)
            np.maximum(r, -self.residual_max, out=r)
            # first-order low-pass: the network's tick-to-tick jitter must not turn into
            # acceleration spikes that the safety filter would clamp
            r -= self.residual
            r *= self.tick_dt / (self.residual_filter_s + self.tick_dt)
            self.residual += r
            out += self.residual
        # keep the brake in step so HOLD starts from the last tracked command
        self.brake.pos[:] = now
        self.brake.vel[:] = self.ref_vel
