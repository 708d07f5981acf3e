"""One episode in lockstep: sim physics, the robot's own follower core, a planner at its rate.

The same code path serves data generation (planner = scripted expert, follower = servo
inverse dynamics) and closed-loop evaluation (planner and follower = the bundle's models): per
follower tick the runtime's `FollowerCore` -- the class the follower process runs -- takes the
newest plan and the measured state and returns the position command for the sim's servos,
only on simulated time. Plan validation, the plan timeout (-> HOLD), the safety state machine
and the command filter are therefore the robot's. A planner's latency is simulated by
offering its plan `latency_s` after the observation it was computed from.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

import numpy as np

from runtime.config import DuetConfig, SimConfig
from runtime.follower.core import CoreSettings, FollowerCore, PlanRejected
from runtime.follower.tracking import ResidualModel, Tracker
from runtime.planner.observation import StateHistory
from sim.task import RUNNING, SUCCESS, Episode, TaskTracker
from sim.world import SimWorld

# (world, state history, tracker) -> (waypoints [H,6], latency_s): the planner renders the
# cameras it reads and samples the history (the follower's state stream) as it needs
PlanFn = Callable[[SimWorld, StateHistory, TaskTracker], tuple[np.ndarray, float]]
# called once per follower tick, after the command is written (data recording)
TickHook = Callable[[float, np.ndarray, np.ndarray, Tracker], None]


@dataclass(frozen=True)
class LoopSettings:
    """The lockstep loop: its rates, plus the robot's own core settings (`core`, from the one
    config mapping `CoreSettings.from_config`: what the follower process runs with).
    `from_config(cfg, **over)` takes overrides of either for studies."""

    physics_hz: float
    follower_hz: float
    planner_hz: float
    dt_s: float
    timeout_s: float
    core: CoreSettings
    # the follower model's look-ahead window (training, not the robot's config)
    lookahead: int = 8
    lookahead_dt: float = 0.02

    @classmethod
    def from_config(cls, cfg: DuetConfig, dt_s: float = 0.1, **over: object) -> LoopSettings:
        core_names = {f.name for f in fields(CoreSettings)}
        core = replace(CoreSettings.from_config(cfg),
                       **{k: v for k, v in over.items() if k in core_names})  # type: ignore[arg-type]
        sim = cfg.sim or SimConfig()  # no sim section: the sim's defaults
        values: dict[str, object] = {
            "physics_hz": sim.physics_hz, "follower_hz": cfg.follower.hz,
            "planner_hz": cfg.planner.hz, "dt_s": dt_s, "timeout_s": sim.episode_timeout_s,
            "core": core}
        values.update({k: v for k, v in over.items() if k not in core_names})
        return cls(**values)  # type: ignore[arg-type]

    def core_at(self, tick_s: float) -> CoreSettings:
        """The core's settings on the lockstep tick (whole physics steps per tick)."""
        return replace(self.core, tick_s=tick_s)


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
    faults: list[str] = field(default_factory=list)  # the core's FAULT reasons
    plans_rejected: dict[str, int] = field(default_factory=dict)
    hold_ticks: int = 0  # ticks in HOLD after the first plan (timeouts, gaps)


def _ns(t: float) -> int:
    return round(t * 1e9)


def run_episode(world: SimWorld, episode: Episode, plan_fn: PlanFn,
                model: ResidualModel | None, s: LoopSettings,
                start_q: np.ndarray | None = None, tick_hook: TickHook | None = None,
                task: TaskTracker | None = None) -> EpisodeResult:
    """Run one episode to success or timeout; the arm starts at rest at `start_q`
    (default: where it is). `task`: another judge of the episode than its blocks (a time
    limit alone, for tracking studies)."""
    n = world.actuators.n
    steps_per_tick = round(s.physics_hz / s.follower_hz)
    ticks_per_plan = round(s.follower_hz / s.planner_hz)
    if steps_per_tick < 1 or ticks_per_plan < 1:
        raise ValueError("need physics_hz >= follower_hz >= planner_hz")
    tick_dt = steps_per_tick / s.physics_hz
    world.set_joint_state(start_q if start_q is not None else world.q())
    act = world.actuators
    with act.lock:
        act.torque_enabled[:] = True
        act.hw_error[:] = 0
    task = task if task is not None else TaskTracker(episode, timeout_s=s.timeout_s)
    task.start(world, world.time)
    core = FollowerCore(s.core_at(tick_dt), model)
    q0 = world.q()
    core.start(_ns(world.time), q0, held=q0)  # servos on, at rest, holding q0
    tracker = core.tracker
    history = StateHistory(n)
    pending: list[tuple[float, np.ndarray, float]] = []  # (t_deliver, waypoints, t_obs)
    pos_hist = np.zeros((4, n))  # reference at the command time, last four ticks
    boundaries_seen = 0
    watch_until = -1.0
    boundary_steps: list[float] = []
    boundary_jerks: list[float] = []
    cur_step, cur_jerk = 0.0, 0.0
    sq_err, n_err = 0.0, 0
    calls = hold_ticks = 0
    status = RUNNING
    tick = 0
    while status == RUNNING:
        t = world.time
        q, dq = world.q(), world.dq()
        history.add(_ns(t), q=q, dq=dq, q_cmd=core.command)
        if tick % ticks_per_plan == 0:
            waypoints, latency = plan_fn(world, history, task)
            calls += 1
            pending.append((t + latency, waypoints, t))
        while pending and pending[0][0] <= t + 1e-9:
            t_deliver, w, t_obs = pending.pop(0)
            try:
                core.offer_plan(np.asarray(w, dtype=np.float64), s.dt_s, _ns(t_obs),
                                _ns(t_deliver))
            except PlanRejected as exc:
                core.reject(exc.kind)
        if core.step(_ns(t), q, dq):
            with act.lock:
                act.goal_q[:] = core.command
            core.slack()  # lockstep: every tick has slack
        else:  # ESTOP, or FAULT with torque off: what the servos would do
            with act.lock:
                act.torque_enabled[:] = False
        if core.mode.name == "TRACK":
            sq_err += float(np.sum((q - tracker.ref_now) ** 2))
            n_err += n
        elif calls > 1 and core.mode.name == "HOLD":
            hold_ticks += 1
        # A plan took effect (broker: possibly long after it arrived). The first two
        # boundaries are the hold seed and the first plan, not chunk-to-chunk transitions.
        if tracker.reference.boundaries != boundaries_seen:
            if boundaries_seen >= 2:
                if watch_until > 0:
                    boundary_steps.append(cur_step)
                    boundary_jerks.append(cur_jerk)
                watch_until, cur_step, cur_jerk = t + max(s.core.blend_s, 4 * tick_dt), 0.0, 0.0
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
    faults = [tr.reason for tr in core.transitions if tr.new.name in ("FAULT", "ESTOP")]
    return EpisodeResult(
        seed=episode.seed, instruction=episode.instruction, n_targets=len(episode.order),
        success=status == SUCCESS, duration_s=task.duration_s, touched=len(task.touched),
        planner_calls=calls, boundary_vel_step=boundary_steps, boundary_jerk=boundary_jerks,
        tracking_rms=float(np.sqrt(sq_err / n_err)) if n_err else 0.0,
        clamped=core.filter.clamped, faults=faults, plans_rejected=dict(core.plans_rejected),
        hold_ticks=hold_ticks)
