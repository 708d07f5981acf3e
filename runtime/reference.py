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


def smoothstep5(x: np.ndarray, a: np.ndarray, da: np.ndarray) -> None:
    """Quintic smoothstep of x (clipped to [0, 1] in place) into `a`, its derivative into
    `da`: zero slope and curvature at both ends."""
    np.clip(x, 0.0, 1.0, out=x)
    # a = x^3 (x (6x - 15) + 10), da = 30 x^2 (x (x - 2) + 1)
    np.multiply(x, 6.0, out=a)
    a -= 15.0
    a *= x
    a += 10.0
    a *= x
    a *= x
    a *= x
    np.subtract(x, 2.0, out=da)
    da *= x
    da += 1.0
    da *= x
    da *= x
    da *= 30.0


@dataclass
class _Layer:
    plan: Plan
    t_switch: float


class ReferenceGenerator:
    """Combines the stream of plans into one reference according to `strategy`."""

    def __init__(self, n_joints: int, strategy: str = "blend", blend_s: float = 0.08) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown chunk strategy {strategy!r}; expected one of {STRATEGIES}")
        self.n = n_joints
        self.strategy = strategy
        self.blend_s = blend_s
        self._layers: list[_Layer] = []
        self._pending: Plan | None = None  # broker: newest plan waiting for the current one
        self._scratch: dict[int, Scratch] = {}  # by number of sample times
        self.boundaries = 0  # plans that took effect

    @property
    def has_plan(self) -> bool:
        return bool(self._layers)

    @property
    def t_end(self) -> float:
        """When the reference, as it stands, runs out (a pending broker plan included)."""
        ends = [layer.plan.t_end for layer in self._layers]
        if self._pending is not None:
            ends.append(self._pending.t_end)
        return max(ends, default=float("-inf"))

    def copy(self) -> ReferenceGenerator:
        """A generator with the same plans (plans are immutable; only the lists are new), to
        prepare the next reference beside the one in use."""
        other = ReferenceGenerator(self.n, self.strategy, self.blend_s)
        other._layers = [_Layer(layer.plan, layer.t_switch) for layer in self._layers]
        other._pending = self._pending
        other._scratch = self._scratch
        other.boundaries = self.boundaries
        return other

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
            self._layers.clear()
        elif len(self._layers) >= 4:  # bounded depth: plans arrive far slower than blends end
            del self._layers[0]
        self._layers.append(_Layer(plan, t_now))

    def expired(self, t: float) -> bool:
        """True when the newest plan has run out at time t (planner dead or too slow)."""
        if self._pending is not None:
            return False
        return not self._layers or t >= self._layers[-1].plan.t_end

    def scratch(self, n: int) -> Scratch:
        sc = self._scratch.get(n)
        if sc is None:
            sc = self._scratch[n] = Scratch(n, self.n)
        return sc

    def evaluate(self, times: np.ndarray, pos: np.ndarray, vel: np.ndarray) -> None:
        """Reference position/velocity at `times` [n] (ascending) into pos/vel [n, D]."""
        layers = self._layers
        t0 = float(times[0])
        if self._pending is not None and t0 >= layers[-1].plan.t_end:
            pending, self._pending = self._pending, None
            self._take(pending, t0)
        if self.strategy == "blend":  # layers before the newest finished blend no longer count
            last_done = 0
            for i in range(1, len(layers)):
                if t0 >= layers[i].t_switch + self.blend_s:
                    last_done = i
            if last_done:
                del layers[:last_done]
        sc = self.scratch(times.shape[0])
        layers[0].plan.sample(times, pos, vel, sc)
        done_upto = 0
        tp, tv, tmp = sc.pos, sc.vel, sc.tmp2
        for i in range(1, len(layers)):
            layer = layers[i]
            layer.plan.sample(times, tp, tv, sc)
            if self.strategy == "blend":
                if self.blend_s <= 0.0:
                    np.copyto(pos, tp)
                    np.copyto(vel, tv)
                    continue
                np.subtract(times, layer.t_switch, out=sc.u)
                sc.u *= 1.0 / self.blend_s
                smoothstep5(sc.u, sc.a0, sc.da0)
                sc.da *= 1.0 / self.blend_s
                a, da = sc.a, sc.da
                # d/dt[(1-a) r + a p] = (1-a) r' + a p' + a' (p - r)
                np.subtract(1.0, a, out=sc.w)
                vel *= sc.w
                np.multiply(tv, a, out=tmp)
                vel += tmp
                np.subtract(tp, pos, out=tmp)
                tmp *= da
                vel += tmp
                pos *= sc.w
                np.multiply(tp, a, out=tmp)
                pos += tmp
            else:  # average: constant weights while the older chunk still covers t
                t_end_old = layers[i - 1].plan.t_end
                np.less(times, t_end_old, out=sc.late0)
                sc.w.fill(1.0)
                np.copyto(sc.w, AVERAGE_NEW_WEIGHT, where=sc.late)
                np.subtract(1.0, sc.w, out=sc.a)
                pos *= sc.a
                np.multiply(tp, sc.w, out=tmp)
                pos += tmp
                vel *= sc.a
                np.multiply(tv, sc.w, out=tmp)
                vel += tmp
                if t0 >= t_end_old:
                    done_upto = i
        if done_upto:
            del layers[:done_upto]
