"""Success for a company's own task on its own robot (`sim.success`): a joint pose or an MJCF
site's position to reach and hold, judged in the lockstep episode like the touch task
(sim/task.py TaskTracker, whose interface this shares: `policy.rollout.run_episode(task=...)`).
"""

from __future__ import annotations

import numpy as np

from runtime.config import SuccessMeasure
from sim.task import RUNNING, SUCCESS, TIMEOUT, Episode, TaskTracker
from sim.world import SimWorld


class TargetJudge(TaskTracker):
    """Success once the target has been within tolerance for `hold_s` in a row; a timeout
    after `timeout_s`. No blocks are placed (`touched` stays empty)."""

    def __init__(self, episode: Episode, measure: SuccessMeasure, world: SimWorld,
                 joints: list[str], timeout_s: float) -> None:
        super().__init__(episode, timeout_s)
        self.measure = measure
        if measure.kind == "pose":
            unknown = sorted(set(measure.pose) - set(joints))
            if unknown:
                raise ValueError(f"sim.success.pose names {', '.join(unknown)}, not among the "
                                 f"robot's joints ({', '.join(joints)})")
            self.index = np.array([joints.index(j) for j in measure.pose])
            self.target = np.array(list(measure.pose.values()))
            self.tolerance = measure.tolerance_rad
        else:
            assert measure.site is not None and measure.position is not None
            try:
                self.site = world.model.site(measure.site).id
            except KeyError:
                raise ValueError(f"sim.success.site {measure.site!r}: no such site in the "
                                 "robot's MJCF") from None
            self.target = np.asarray(measure.position, dtype=np.float64)
            self.tolerance = measure.tolerance_m
        self.t_inside: float | None = None

    def error(self, world: SimWorld) -> float:
        """rad (the worst joint named) or m (the site's distance) from the target."""
        if self.measure.kind == "pose":
            return float(np.abs(world.q()[self.index] - self.target).max())
        return float(np.linalg.norm(world.data.site_xpos[self.site] - self.target))

    def start(self, world: SimWorld, t: float) -> None:
        world.place_blocks({})  # the touch task's blocks are not this task's
        self.status, self.t_start, self.t_end, self.t_inside = RUNNING, t, None, None

    def remaining(self) -> np.ndarray:
        return np.zeros((0, 3))

    def update(self, world: SimWorld, t: float) -> str:
        if self.status != RUNNING:
            return self.status
        if self.error(world) <= self.tolerance:
            self.t_inside = t if self.t_inside is None else self.t_inside
            if t - self.t_inside >= self.measure.hold_s:
                self.status, self.t_end = SUCCESS, t
                return self.status
        else:
            self.t_inside = None
        if t - self.t_start >= self.timeout_s:
            self.status, self.t_end = TIMEOUT, t
        return self.status


def describe_measure(m: SuccessMeasure) -> str:
    """One line for the eval table's heading."""
    if m.kind == "blocks":
        return "the sim's touch task (every named block touched, in order)"
    if m.kind == "pose":
        targets = ", ".join(f"{j} {v:+.3f}" for j, v in m.pose.items())
        return f"pose within {m.tolerance_rad:g} rad of {targets} rad, held {m.hold_s:g} s"
    assert m.position is not None
    where = ", ".join(f"{v:g}" for v in m.position)
    return f"site {m.site} within {m.tolerance_m:g} m of ({where}) m, held {m.hold_s:g} s"
