"""How far a candidate planner's chunks are from the active planner's, in action space: per
joint and per horizon step, in radians, over the plans compared (`duet bundle shadow`).

Both chunks answer the same observation (same t_obs), so they are compared at the candidate's
waypoint times t_obs + (k+1)·dt; an active chunk on another grid is interpolated there and
held past its end, as the follower holds a chunk that ran out.
"""

from __future__ import annotations

from collections import deque

import numpy as np

KEPT_PLANS = 2000  # the report's window: the newest this many plans


def abs_difference(candidate: np.ndarray, candidate_dt: float, active: np.ndarray,
                   active_dt: float) -> np.ndarray:
    """|candidate - active| [H_candidate, D], rad."""
    if candidate.shape == active.shape and candidate_dt == active_dt:
        return np.abs(candidate - active)
    t_c = (np.arange(candidate.shape[0]) + 1) * candidate_dt
    t_a = (np.arange(active.shape[0]) + 1) * active_dt
    resampled = np.stack([np.interp(t_c, t_a, active[:, j]) for j in range(active.shape[1])],
                         axis=1)
    return np.abs(candidate - resampled)


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"mean": round(float(x.mean()), 6), "p95": round(float(np.percentile(x, 95)), 6),
            "max": round(float(x.max()), 6)}


class Divergence:
    """The differences of the newest KEPT_PLANS plans, summarised on demand."""

    def __init__(self, joints: list[str]) -> None:
        self.joints = joints
        self.diffs: deque[np.ndarray] = deque(maxlen=KEPT_PLANS)
        self.plans = 0  # compared, all told

    def add(self, diff: np.ndarray) -> None:
        if self.diffs and diff.shape != self.diffs[0].shape:
            self.diffs.clear()  # another horizon (a new candidate): a new window
        self.diffs.append(diff.astype(np.float32))
        self.plans += 1

    def summary(self) -> dict[str, object]:
        """{mean, p95, max} over everything, per joint (every step) and per horizon step
        (every joint); empty before the first plan."""
        if not self.diffs:
            return {}
        d = np.stack(self.diffs)  # [plans, H, D]
        return {**_stats(d),
                "per_joint": {name: _stats(d[:, :, j]) for j, name in enumerate(self.joints)},
                "per_step": [_stats(d[:, k, :]) for k in range(d.shape[1])]}
