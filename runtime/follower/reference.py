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

from runtime.model.plan import Plan, Scratch

STRATEGIES = ("blend", "broker", "average", "switch")
AVERAGE_NEW_WEIGHT = 0.7


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
