"""The scripted expert the planner learns to imitate.

`expert_chunk` is a pure function of the joint position and the targets left to touch (no
memory, no velocity), because the planner that imitates it sees only (image, instruction, q)
and re-plans every 0.2 s. Goal selection: the cached IK pose `PRE_TOUCH_HEIGHT` above the
next target's top face until the fingertip is within `ALIGN_RADIUS` of it horizontally, then
the pose `TOUCH_HEIGHT` above the top face (straight down onto it).

Profile: minimum-jerk from rest, re-started from every new q, crawls (a 1 rad move advances
~2 % per 0.2 s re-plan), so the chunk follows the memoryless profile instead: the joints move
on the straight joint-space line to the goal at a cruise speed (`VELOCITY_FRACTION` of the
velocity limits, the slowest joint setting the pace) and hand over to a first-order approach
(time constant `TAU_S`) near the goal. Re-planning from any point of that curve yields the
same curve, so chunks from successive re-plans agree and the arm converges. Velocity is
continuous (the hand-over happens at equal speed); acceleration peaks at cruise/TAU_S.

Gripper: held at its home value (duet's arm: nearly closed; the fingers form the pointer).
Any robot with an end-effector site works: the goals come from its IK (`ArmKinematics`,
MuJoCo's site Jacobian), the joint count from its description.
"""

from __future__ import annotations

import numpy as np

from sim.world import ArmKinematics, SimWorld

PRE_TOUCH_HEIGHT = 0.08  # m above the top face
TOUCH_HEIGHT = 0.01  # m above the top face: inside the touch radius without pressing
ALIGN_RADIUS = 0.02  # m, horizontal fingertip-to-target distance that starts the descent
VELOCITY_FRACTION = 0.4  # of velocity_max, cruise speed of the slowest joint
TAU_S = 0.2  # s, time constant of the final approach
VELOCITY_MAX = 3.0  # rad/s, configs/sim.yaml robot.limits.velocity_max


def expert_goal(kin: ArmKinematics, remaining: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Joint goal [n] for the current phase: pre-touch pose, touch pose, or hold."""
    goal = np.array(q, dtype=float)
    if len(remaining):
        target = np.asarray(remaining[0], dtype=float)
        tip = kin.fingertip(q)
        aligned = np.linalg.norm(tip[:2] - target[:2]) < ALIGN_RADIUS
        height = TOUCH_HEIGHT if aligned else PRE_TOUCH_HEIGHT
        goal = kin.ik_cached(target + np.array([0.0, 0.0, height]))
    gripper = kin.robot.gripper
    if gripper is not None:
        goal[gripper] = kin.robot.home[gripper]
    return goal


def expert_chunk(world_or_kin: SimWorld | ArmKinematics, remaining: np.ndarray, q: np.ndarray,
                 horizon: int = 10, dt: float = 0.1,
                 velocity_max: np.ndarray | float = VELOCITY_MAX) -> np.ndarray:
    """Expert waypoints float32 [horizon, n]: absolute joint targets at t + (k+1)·dt from
    joint position q [n], given the untouched targets' top centres `remaining` [k, 3] in
    order (`TaskTracker.remaining()`). No targets left: hold q (gripper to its pointer value).
    """
    kin = world_or_kin.kin if isinstance(world_or_kin, SimWorld) else world_or_kin
    n = kin.robot.n
    q = np.asarray(q, dtype=float)
    if q.shape != (n,) or not np.isfinite(q).all():
        raise ValueError(f"q must be {n} finite joint positions, got {q!r}")
    remaining = np.asarray(remaining, dtype=float).reshape(-1, 3)
    goal = expert_goal(kin, remaining, q)
    delta = goal - q
    speed = VELOCITY_FRACTION * np.broadcast_to(np.asarray(velocity_max, dtype=float), (n,))
    # Time to go at cruise speed, set by the slowest joint; it shrinks at 1 s/s while
    # cruising, then decays exponentially once below TAU_S.
    d0 = float(np.max(np.abs(delta) / speed))
    t = dt * np.arange(1, horizon + 1)
    if d0 <= 0.0:
        return np.tile(goal, (horizon, 1)).astype(np.float32)
    t_cruise = max(d0 - TAU_S, 0.0)
    d_handover = min(d0, TAU_S)
    d = np.where(t < t_cruise, d0 - t, d_handover * np.exp(-(t - t_cruise) / TAU_S))
    frac = 1.0 - d / d0
    return (q + frac[:, None] * delta).astype(np.float32)
