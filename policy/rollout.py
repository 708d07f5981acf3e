"""One episode in lockstep: sim physics, the runtime's tracking path, a planner at its rate.

The same code path serves data generation (planner = scripted expert, follower = servo
inverse dynamics) and closed-loop evaluation (planner and follower = ONNX engines): per
follower tick the runtime's `Tracker` (reference generator + residual engine) and
`SafetyFilter` turn the newest plan into a position command for the sim's servos, exactly
as the follower process does, only on simulated time. A planner's latency is simulated by
delivering its plan `latency_s` after the observation it was computed from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from runtime.config import DuetConfig
from runtime.reference import ReferenceGenerator
from runtime.safety import SafetyFilter
from runtime.tracking import ResidualEngine, Tracker
from sim.task import RUNNING, SUCCESS, Episode, TaskTracker
from sim.world import SimWorld

# (image uint8 [96,96,3], q [6], tracker) -> (waypoints [H,6], latency_s)
PlanFn = Callable[[np.ndarray, np.ndarray, TaskTracker], tuple[np.ndarray, float]]
# called once per follower tick, after the command is written (data recording)
TickHook = Callable[[float, np.ndarray, np.ndarray, Tracker], None]


@dataclass(frozen=True)
class LoopSettings:
    """Rates and limits of the lockstep loop (from a DuetConfig, overridable for studies)."""

    physics_hz: float
    follower_hz: float
    planner_hz: float
    dt_s: float
    strategy: str
    blend_s: float
    residual_max: float
    residual_filter_s: float
    hold_decel: float
    timeout_s: float
    pos_min: np.ndarray
    pos_max: np.ndarray
    vel_max: np.ndarray
    acc_max: np.ndarray
    lookahead: int = 8
    lookahead_dt: float = 0.02

    @classmethod
    def from_config(cls, cfg: DuetConfig, dt_s: float = 0.1, **over: object) -> LoopSettings:
        lim = cfg.robot.limits
        sim = cfg.sim
        values: dict[str, object] = {
            "physics_hz": sim.physics_hz if sim else 1000.0,
            "follower_hz": cfg.follower.hz, "planner_hz": cfg.planner.hz, "dt_s": dt_s,
            "strategy": cfg.follower.chunk_strategy, "blend_s": cfg.follower.blend_ms / 1e3,
            "residual_max": cfg.follower.residual_max, "hold_decel": cfg.follower.hold_decel,
            "residual_filter_s": cfg.follower.residual_filter_ms / 1e3,
            "timeout_s": sim.episode_timeout_s if sim else 12.0,
            "pos_min": np.array(lim.position_min), "pos_max": np.array(lim.position_max),
            "vel_max": np.array(lim.velocity_max), "acc_max": np.array(lim.accel_max),
        }
        values.update(over)
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class EpisodeResult:
    seed: int
    instruction: str
    n_targets: int
    success: bool
    duration_s: float
    touched: int
    planner_calls: int
    # per plan boundary: largest tick-to-tick step of the reference velocity (rad/s) and
    # largest jerk (rad/s^3) within one blend window after the plan took effect: what the
    # chunk strategy itself produces, before the residual and the safety filter
    boundary_vel_step: list[float] = field(default_factory=list)
    boundary_jerk: list[float] = field(default_factory=list)
    tracking_rms: float = 0.0  # rad, measured q vs the reference at the same time
    clamped: int = 0


def run_episode(world: SimWorld, episode: Episode, plan_fn: PlanFn,
                engine: ResidualEngine | None, s: LoopSettings,
                start_q: np.ndarray | None = None, tick_hook: TickHook | None = None,
                ) -> EpisodeResult:
    """Run one episode to success or timeout; the arm starts at rest at `start_q`
    (default: where it is)."""
    n = world.actuators.n
    steps_per_tick = round(s.physics_hz / s.follower_hz)
    ticks_per_plan = round(s.follower_hz / s.planner_hz)
    if steps_per_tick < 1 or ticks_per_plan < 1:
        raise ValueError("need physics_hz >= follower_hz >= planner_hz")
    tick_dt = steps_per_tick / s.physics_hz
    if start_q is not None:
        world.set_joint_state(start_q)
    else:
        world.set_joint_state(world.q())
    act = world.actuators
    with act.lock:
        act.torque_enabled[:] = True
        act.hw_error[:] = 0
    task = TaskTracker(episode, timeout_s=s.timeout_s)
    task.start(world, world.time)
    tracker = Tracker(n, tick_dt, ReferenceGenerator(n, s.strategy, s.blend_s), engine,
                      lookahead=s.lookahead, lookahead_dt=s.lookahead_dt,
                      residual_max=s.residual_max, residual_filter_s=s.residual_filter_s,
                      hold_decel=s.hold_decel)
    safety = SafetyFilter(s.pos_min, s.pos_max, s.vel_max, s.acc_max, tick_dt)
    q0 = world.q()
    safety.reset(q0)
    tracker.start_hold(q0, np.zeros(n))
    desired, cmd = np.zeros(n), np.zeros(n)
    pending: list[tuple[float, np.ndarray, float]] = []  # (t_deliver, waypoints, t_obs)
    pos_hist = np.zeros((4, n))  # reference at the command time, last four ticks
    boundaries_seen = 0
    watch_until = -1.0
    boundary_steps: list[float] = []
    boundary_jerks: list[float] = []
    cur_step, cur_jerk = 0.0, 0.0
    sq_err, n_err = 0.0, 0
    calls = 0
    status = RUNNING
    tick = 0
    while status == RUNNING:
        t = world.time
        q, dq = world.q(), world.dq()
        if tick % ticks_per_plan == 0:
            waypoints, latency = plan_fn(world.render(), q, task)
            calls += 1
            pending.append((t + latency, waypoints, t))
        while pending and pending[0][0] <= t + 1e-9:
            _, w, t_obs = pending.pop(0)
            tracker.add_plan(w, s.dt_s, t_obs, t)
        if tracker.reference.has_plan and not tracker.reference.expired(t):
            tracker.track_command(t, q, dq, desired)
            sq_err += float(np.sum((q - tracker.ref_now) ** 2))
            n_err += n
        else:
            desired[:] = tracker.hold_command()
        safety.apply(desired, cmd)
        with act.lock:
            act.goal_q[:] = cmd
        # A plan took effect (broker: possibly long after it arrived). The first two
        # boundaries are the hold seed and the first plan, not chunk-to-chunk transitions.
        if tracker.reference.boundaries != boundaries_seen:
            if boundaries_seen >= 2:
                if watch_until > 0:
                    boundary_steps.append(cur_step)
                    boundary_jerks.append(cur_jerk)
                watch_until, cur_step, cur_jerk = t + max(s.blend_s, 4 * tick_dt), 0.0, 0.0
            boundaries_seen = tracker.reference.boundaries
        pos_hist[:3] = pos_hist[1:]
        pos_hist[3] = tracker.ref_now
        if t <= watch_until and tick >= 4:
            acc = np.diff(pos_hist, n=2, axis=0)  # [2, n] times dt^2
            cur_step = max(cur_step, float(np.abs(acc[1]).max()) / tick_dt)
            cur_jerk = max(cur_jerk, float(np.abs(acc[1] - acc[0]).max()) / tick_dt**3)
        if tick_hook is not None:
            tick_hook(t, q, dq, tracker)
        world.step(steps_per_tick)
        status = task.update(world, world.time)
        tick += 1
    if watch_until > 0:
        boundary_steps.append(cur_step)
        boundary_jerks.append(cur_jerk)
    return EpisodeResult(
        seed=episode.seed, instruction=episode.instruction, n_targets=len(episode.order),
        success=status == SUCCESS, duration_s=task.duration_s, touched=len(task.touched),
        planner_calls=calls, boundary_vel_step=boundary_steps, boundary_jerk=boundary_jerks,
        tracking_rms=float(np.sqrt(sq_err / n_err)) if n_err else 0.0, clamped=safety.clamped)
