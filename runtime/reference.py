"""Plans in, a continuous joint reference out (DESIGN.md, "Plan semantics").

A plan says "joint targets w[k] at t_obs + (k+1)·dt". It is interpolated with a C1 cubic
Hermite spline evaluated on the follower's clock, so the part of the chunk that elapsed while
the planner was thinking is skipped, not replayed. Consecutive plans are combined by one of
four chunk-execution strategies:

- ``blend`` (duet): cross-fade from the previous reference to the new plan over a window with
  a quintic smoothstep, so position, velocity and acceleration stay continuous;
- ``switch``: take the newest plan at once (a step at every boundary);
- ``average``: weighted average of overlapping chunks, 0.3 old / 0.7 new (LeRobot's default);
- ``broker``: finish the whole chunk before taking the next (openpi's chunk broker).

Times are float seconds on the monotonic clock. All evaluation writes into caller buffers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

STRATEGIES = ("blend", "broker", "average", "switch")
AVERAGE_NEW_WEIGHT = 0.7


class Plan:
    """One chunk as a cubic Hermite spline through (t_obs, p0), (t_obs + (k+1)·dt, w[k])."""

    __slots__ = ("coef", "dt", "n_points", "t0", "t_end", "t_recv")

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
        self.dt = dt
        self.t0, self.t_recv = t_obs, t_recv
        self.n_points = p.shape[0]
        self.t_end = t_obs + (p.shape[0] - 1) * dt
        # Per segment, the Hermite cubic in power form c0 + c1 s + c2 s^2 + c3 s^3 (s in
        # [0, 1)): computed once here so sampling at the tick rate is a handful of ops.
        p0, p1, m0, m1 = p[:-1], p[1:], m[:-1] * dt, m[1:] * dt
        self.coef = np.stack([p0, m0, 3 * (p1 - p0) - 2 * m0 - m1, 2 * (p0 - p1) + m0 + m1],
                             axis=1)  # [segments, 4, D]

    def sample(self, times: np.ndarray, pos: np.ndarray, vel: np.ndarray) -> None:
        """Position and velocity at `times` [n] into pos/vel [n, D]; held at the ends."""
        u = (times - self.t0) / self.dt
        np.clip(u, 0.0, self.n_points - 1 - 1e-9, out=u)
        k = u.astype(np.intp)
        s = (u - k)[:, None]
        c = self.coef[k]  # [n, 4, D]
        c0, c1, c2, c3 = c[:, 0], c[:, 1], c[:, 2], c[:, 3]
        np.copyto(pos, ((c3 * s + c2) * s + c1) * s + c0)
        np.copyto(vel, ((3.0 * c3 * s + 2.0 * c2) * s + c1) * (1.0 / self.dt))
        late = times >= self.t_end
        if late.any():
            vel[late] = 0.0


def smoothstep5(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quintic smoothstep and its derivative: zero slope and curvature at both ends."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * x * (x * (6 * x - 15) + 10), 30 * x * x * (x * (x - 2) + 1)


@dataclass
class _Layer:
    plan: Plan
    t_switch: float


class ReferenceGenerator:
    """Combines the stream of plans into one reference according to `strategy`."""

    def __init__(self, n_joints: int, strategy: str = "blend", blend_s: float = 0.08,
                 max_points: int = 16) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown chunk strategy {strategy!r}; expected one of {STRATEGIES}")
        self.n = n_joints
        self.strategy = strategy
        self.blend_s = blend_s
        self._layers: list[_Layer] = []
        self._pending: Plan | None = None  # broker: newest plan waiting for the current one
        self._tmp_pos = np.zeros((max_points, n_joints))
        self._tmp_vel = np.zeros((max_points, n_joints))
        self.boundaries = 0  # plans that took effect

    @property
    def has_plan(self) -> bool:
        return bool(self._layers)

    def clear(self) -> None:
        self._layers.clear()
        self._pending = None

    def add_plan(self, plan: Plan, t_now: float) -> None:
        if self.strategy == "broker" and self._layers and t_now < self._layers[-1].plan.t_end:
            self._pending = plan
            return
        self._take(plan, t_now)

    def _take(self, plan: Plan, t_now: float) -> None:
        self.boundaries += 1
        if self.strategy in ("switch", "broker") or not self._layers:
            self._layers = [_Layer(plan, t_now)]
        else:
            self._layers.append(_Layer(plan, t_now))
            if len(self._layers) > 4:  # bounded depth: plans arrive far slower than blends end
                del self._layers[0]

    def expired(self, t: float) -> bool:
        """True when the newest plan has run out at time t (planner dead or too slow)."""
        if self._pending is not None:
            return False
        return not self._layers or t >= self._layers[-1].plan.t_end

    def evaluate(self, times: np.ndarray, pos: np.ndarray, vel: np.ndarray) -> None:
        """Reference position/velocity at `times` [n] (ascending) into pos/vel [n, D]."""
        if self._pending is not None and times[0] >= self._layers[-1].plan.t_end:
            pending, self._pending = self._pending, None
            self._take(pending, float(times[0]))
        if self.strategy == "blend":  # layers before the newest finished blend no longer count
            t0 = times[0]
            done = [i for i, layer in enumerate(self._layers)
                    if t0 >= layer.t_switch + self.blend_s]
            if done and done[-1] > 0:
                del self._layers[:done[-1]]
        n = times.shape[0]
        tp, tv = self._tmp_pos[:n], self._tmp_vel[:n]
        first = self._layers[0]
        first.plan.sample(times, pos, vel)
        done_upto = 0
        for i, layer in enumerate(self._layers[1:], start=1):
            layer.plan.sample(times, tp, tv)
            if self.strategy == "blend":
                if self.blend_s <= 0.0:
                    a = np.ones((n, 1))
                    da = np.zeros((n, 1))
                else:
                    x = (times - layer.t_switch) / self.blend_s
                    a, da = smoothstep5(x)
                    a, da = a[:, None], da[:, None] / self.blend_s
                # d/dt[(1-a) r + a p] = (1-a) r' + a p' + a' (p - r)
                vel *= 1.0 - a
                vel += a * tv + da * (tp - pos)
                pos *= 1.0 - a
                pos += a * tp
            else:  # average: constant weights while the older chunk still covers t
                covered = (times < self._layers[i - 1].plan.t_end)[:, None]
                w = np.where(covered, AVERAGE_NEW_WEIGHT, 1.0)
                pos *= 1.0 - w
                pos += w * tp
                vel *= 1.0 - w
                vel += w * tv
                if times[0] >= self._layers[i - 1].plan.t_end:
                    done_upto = i
        if done_upto:
            del self._layers[:done_upto]
