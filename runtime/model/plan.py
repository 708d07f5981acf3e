"""A plan as both processes see it: the chunk's bounds (what any receiver accepts) and the chunk
as a cubic Hermite spline on the monotonic clock (DESIGN.md, "Plan semantics").

The planner builds plans, the relay checks them with the same `PlanBounds.check` as the
follower core before it publishes them, the follower samples them; this module is the one
place all three take them from."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MAX_WAYPOINTS = 256
MIN_DT_S, MAX_DT_S = 1e-3, 1.0


class PlanRejected(ValueError):
    """A plan a receiver refuses; `kind` is the drop-counter key."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def check_chunk(waypoints: np.ndarray, dt_s: float, n_joints: int) -> None:
    """A chunk `Plan` can be built from: [2..MAX_WAYPOINTS, n_joints] waypoints, dt_s in
    range (one waypoint or dt_s = 0 would break the spline). Raises PlanRejected."""
    if waypoints.ndim != 2 or waypoints.shape[1] != n_joints:
        raise PlanRejected("shape", f"waypoints shape {list(waypoints.shape)}, expected "
                                    f"[H, {n_joints}]")
    h = waypoints.shape[0]
    if not 2 <= h <= MAX_WAYPOINTS:
        raise PlanRejected("shape", f"{h} waypoints, expected 2..{MAX_WAYPOINTS}")
    if not MIN_DT_S <= dt_s <= MAX_DT_S:
        raise PlanRejected("dt", f"dt_s {dt_s!r} outside [{MIN_DT_S}, {MAX_DT_S}] s")


class PlanBounds:
    """What a robot accepts of a plan, whatever its clock says: `check_chunk` and every
    waypoint inside the joint limits widened by the plan margin. The follower core and the
    relay (which must not publish what the follower would refuse, nor crash on it) both call
    `check`; the checks that need the follower's clock (age, replay) stay in the core."""

    __slots__ = ("hi", "lo", "n")

    def __init__(self, pos_min: Sequence[float] | np.ndarray,
                 pos_max: Sequence[float] | np.ndarray, margin: float) -> None:
        self.lo = np.asarray(pos_min, dtype=np.float64) - margin
        self.hi = np.asarray(pos_max, dtype=np.float64) + margin
        self.n = self.lo.shape[0]

    @classmethod
    def joints_only(cls, n_joints: int) -> PlanBounds:
        """No limits (a bench's robot without a config): the chunk's structure only."""
        return cls(np.full(n_joints, -np.inf), np.full(n_joints, np.inf), 0.0)

    def check(self, waypoints: np.ndarray, dt_s: float) -> None:
        check_chunk(waypoints, dt_s, self.n)
        if ((waypoints < self.lo) | (waypoints > self.hi)).any():
            raise PlanRejected("limits", "waypoints outside joint limits")


class Scratch:
    """Work buffers for sampling `n` times of a D-joint reference (no allocation per call)."""

    def __init__(self, n: int, d: int) -> None:
        self.n = n
        self.u = np.zeros(n)
        self.f = np.zeros(n)
        self.k = np.zeros(n, dtype=np.intp)
        self.s = np.zeros((n, 1))
        self.s0 = self.s[:, 0]
        self.c = np.zeros((n, 4, d))
        self.c0, self.c1, self.c2, self.c3 = (self.c[:, i] for i in range(4))
        self.late = np.zeros((n, 1), dtype=bool)
        self.late0 = self.late[:, 0]
        self.tmp = np.zeros((n, d))
        self.tmp2 = np.zeros((n, d))
        self.pos = np.zeros((n, d))  # a second layer's samples, for blending
        self.vel = np.zeros((n, d))
        self.a = np.zeros((n, 1))
        self.da = np.zeros((n, 1))
        self.w = np.zeros((n, 1))
        self.a0, self.da0 = self.a[:, 0], self.da[:, 0]


class Plan:
    """One chunk as a cubic Hermite spline through (t_obs, p0), (t_obs + (k+1)·dt, w[k])."""

    __slots__ = ("coef", "dt", "inv_dt", "n_points", "t0", "t_end", "t_recv")

    def __init__(self, waypoints: np.ndarray, dt: float, t_obs: float, t_recv: float) -> None:
        w = np.asarray(waypoints, dtype=np.float64)
        # The chunk has no point at t_obs itself; extrapolate one so the first segment is
        # defined (it is normally already in the past when the plan arrives).
        p = np.empty((w.shape[0] + 1, w.shape[1]))
        p[1:] = w
        p[0] = 2.0 * w[0] - w[1]
        # Catmull-Rom tangents, one-sided at the ends; zero velocity at the final waypoint so
        # an expired plan ends at rest.
        m = np.empty_like(p)
        m[1:-1] = (p[2:] - p[:-2]) / (2.0 * dt)
        m[0] = (p[1] - p[0]) / dt
        m[-1] = 0.0
        self.dt, self.inv_dt = dt, 1.0 / dt
        self.t0, self.t_recv = t_obs, t_recv
        self.n_points = p.shape[0]
        self.t_end = t_obs + (p.shape[0] - 1) * dt
        # Per segment, the Hermite cubic in power form c0 + c1 s + c2 s^2 + c3 s^3 (s in
        # [0, 1)): computed once here so sampling at the tick rate is a handful of ops.
        p0, p1, m0, m1 = p[:-1], p[1:], m[:-1] * dt, m[1:] * dt
        self.coef = np.stack([p0, m0, 3 * (p1 - p0) - 2 * m0 - m1, 2 * (p0 - p1) + m0 + m1],
                             axis=1)  # [segments, 4, D]

    def sample(self, times: np.ndarray, pos: np.ndarray, vel: np.ndarray,
               sc: Scratch | None = None) -> None:
        """Position and velocity at `times` [n] into pos/vel [n, D]; held at the ends."""
        if sc is None:
            sc = Scratch(times.shape[0], self.coef.shape[2])
        u = sc.u
        np.subtract(times, self.t0, out=u)
        u *= self.inv_dt
        np.clip(u, 0.0, self.n_points - 1 - 1e-9, out=u)
        np.floor(u, out=sc.f)
        np.copyto(sc.k, sc.f, casting="unsafe")
        np.subtract(u, sc.f, out=sc.s0)
        np.take(self.coef, sc.k, axis=0, out=sc.c)
        s, tmp = sc.s, sc.tmp
        # Horner: p = ((c3 s + c2) s + c1) s + c0, v = ((3 c3 s + 2 c2) s + c1) / dt
        np.multiply(sc.c3, s, out=tmp)
        tmp += sc.c2
        tmp *= s
        tmp += sc.c1
        tmp *= s
        np.add(tmp, sc.c0, out=pos)
        np.multiply(sc.c3, s, out=tmp)
        tmp *= 1.5
        tmp += sc.c2
        tmp *= s
        tmp *= 2.0
        tmp += sc.c1
        np.multiply(tmp, self.inv_dt, out=vel)
        np.greater_equal(times, self.t_end, out=sc.late0)
        np.copyto(vel, 0.0, where=sc.late)
