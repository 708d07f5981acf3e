"""The follower's decisions, in one pure class: no I/O, no clock, no logging, no allocation
per tick in steady state.

Per tick the caller (the follower process, the lockstep eval, the bench) hands in the time
and the measured state; the core answers with the command to write (or that nothing may be
written) and records every mode change, with its reason, in `transitions` for the caller to
apply outside the tick (log, sd_notify, latch file, torque). The core owns:

- plan validation (`offer_plan`): the robot's `PlanBounds` (runtime/model/plan.py, shared with
  the relay), then observation age and replay;
- the safety state machine (`_enter` is the only place `mode` changes);
- tracking (reference generator, residual, braking to a hold) and the command filter.

Times are integer nanoseconds on the caller's monotonic clock; the reference runs on float
seconds since the core's start.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np

from runtime.config import DuetConfig
from runtime.follower.reference import ReferenceGenerator
from runtime.follower.safety import LATCHED, Mode, NonFiniteCommand, SafetyFilter
from runtime.follower.tracking import ResidualModel, Tracker
from runtime.model.plan import Plan, PlanBounds, PlanRejected

FUTURE_TOLERANCE_NS = 5_000_000  # one host, one clock: a plan cannot come from the future
LATCH_PREFIX = "latched before restart: "
# Holding where the arm rested when torque comes on (`_settle`): the integral's time constant,
# several times a position servo's own settling (~30-150 ms) so the two loops do not fight,
# and the most it moves a goal: well above a servo's gravity sag at rest (a few ticks), so
# beyond it the arm is being pushed, not sagging, and the integral does not wind up.
SETTLE_TIME_S = 0.2
SETTLE_MAX_RAD = 0.02


class Transition(NamedTuple):
    old: Mode
    new: Mode
    reason: str


# The settings `duet set` may change on a running core (config.TUNABLES, in core units).
TUNABLE_SETTINGS = frozenset({"strategy", "blend_s", "residual", "residual_max",
                              "residual_filter_s", "hold_decel", "plan_timeout_s"})


@dataclass(frozen=True)
class CoreSettings:
    """What the core decides with, in its units (seconds, radians). No defaults here: they
    live in the config schema, and `from_config` is the one mapping from a config to these,
    used by the follower process, the lockstep eval and the benches alike."""

    joints: tuple[str, ...]
    tick_s: float
    pos_min: np.ndarray
    pos_max: np.ndarray
    vel_max: np.ndarray
    acc_max: np.ndarray
    state_margin: float
    plan_margin: float
    plan_timeout_s: float
    strategy: str
    blend_s: float
    residual: bool
    residual_max: float
    residual_filter_s: float
    hold_decel: float
    bus_error_threshold: int
    storm_misses: int
    storm_window: int
    fault_action: str

    @classmethod
    def from_config(cls, cfg: DuetConfig) -> CoreSettings:
        """The robot's core settings; a study changes one with `dataclasses.replace`."""
        fc, lim = cfg.follower, cfg.robot.limits
        return cls(
            joints=tuple(cfg.robot.joints), tick_s=1.0 / fc.hz,
            pos_min=np.array(lim.position_min), pos_max=np.array(lim.position_max),
            vel_max=np.array(lim.velocity_max), acc_max=np.array(lim.accel_max),
            state_margin=lim.state_margin, plan_margin=lim.plan_margin,
            plan_timeout_s=fc.plan_timeout_ms / 1e3, strategy=fc.chunk_strategy,
            blend_s=fc.blend_ms / 1e3, residual=fc.residual,
            residual_max=fc.residual_max, residual_filter_s=fc.residual_filter_ms / 1e3,
            hold_decel=fc.hold_decel, bus_error_threshold=fc.bus_error_threshold,
            storm_misses=fc.deadline_storm.misses,
            storm_window=fc.deadline_storm.window_ticks, fault_action=fc.fault_action)

    def differences(self, other: CoreSettings) -> list[str]:
        """The names of the settings that differ (arrays compared by value)."""
        return [f.name for f in fields(self)
                if not np.array_equal(getattr(self, f.name), getattr(other, f.name))]


class FollowerCore:
    def __init__(self, s: CoreSettings, model: ResidualModel | None = None) -> None:
        self.s = s
        n = self.n = len(s.joints)
        self.filter = SafetyFilter(s.pos_min, s.pos_max, s.vel_max, s.acc_max, s.tick_s)
        self.tracker = Tracker(n, s.tick_s, ReferenceGenerator(n, s.strategy, s.blend_s),
                               model, residual_max=s.residual_max,
                               residual_filter_s=s.residual_filter_s, hold_decel=s.hold_decel)
        self.tracker.use_residual = s.residual and model is not None
        self.command = np.zeros(n)
        self._desired = np.zeros(n)
        self._state_lo = s.pos_min - s.state_margin
        self._state_hi = s.pos_max + s.state_margin
        self.plan_bounds = PlanBounds(s.pos_min, s.pos_max, s.plan_margin)
        self._bad = np.zeros(n, dtype=bool)
        self._bad2 = np.zeros(n, dtype=bool)
        self._rest = np.zeros(n)  # where the arm rested when torque came on (`_settle`)
        self._rest_offset = np.zeros(n)
        self._rest_err = np.zeros(n)
        self._settling = False

        self.plan_timeout_ns = round(s.plan_timeout_s * 1e9)  # live-tunable
        self.mode = Mode.INIT
        self.reason: str | None = None  # why the core is in FAULT/ESTOP
        self.transitions: list[Transition] = []  # drained by the caller
        self.epoch_ns = 0
        self.bus_dead = False  # the bus failed for good: no traffic until reset
        self.torque_wanted = False
        self._bus_failures = 0
        self._pending = False  # a plan is prepared for the next tick to take
        self._last_t = float("-inf")  # the last tick's time (s since epoch)
        self._newest_t_obs_ns = 0  # of the newest plan taken; 0: none since start or reset
        self._miss_ring = bytearray(s.storm_window)  # scalar access: faster than numpy
        self._miss_i = 0
        self._miss_count = 0
        # counters
        self.mode_ticks = np.zeros(len(Mode), dtype=np.int64)
        self.faults = 0
        self.estops = 0
        self.plans_accepted = 0
        self.plans_rejected: Counter[str] = Counter()
        self.first_track_ns = 0
        self.last_stale_age_ns = 0  # the age of the newest plan dropped as stale

    # ------------------------------------------------------------------ lifecycle
    def start(self, now_ns: int, q: np.ndarray, held: np.ndarray | None,
              latched: str | None = None) -> None:
        """INIT -> HOLD: the first command is what the motors already hold (`held`, when torque
        is on and the bus can tell), else the measured position -- never a jump. A latch from
        before a restart ("ESTOP: why" / "FAULT: why") comes back as it was."""
        self.epoch_ns = now_ns
        self._hold_at(q if held is None else held, settle=held is None)
        if latched is not None:
            mode_name, _, why = latched.partition(": ")
            mode = Mode.ESTOP if mode_name == "ESTOP" else Mode.FAULT
            why = (why or latched).removeprefix(LATCH_PREFIX)  # not once more per restart
            self._enter(mode, LATCH_PREFIX + why)
            self.torque_wanted = held is not None and mode == Mode.FAULT \
                and self.s.fault_action == "hold"
            return
        self.torque_wanted = True
        if not self._state_ok(q):
            return
        self._enter(Mode.HOLD, "started")

    def reset(self, q: np.ndarray, held: np.ndarray | None) -> tuple[bool, str]:
        """Leave FAULT/ESTOP for HOLD at what the motors hold (or the measured position)."""
        if self.mode not in LATCHED:
            return True, f"already {self.mode.name}"
        self._enter(Mode.HOLD, f"reset (was: {self.reason})")
        self.bus_dead = False
        self._bus_failures = 0
        self._miss_ring[:] = bytes(len(self._miss_ring))
        self._miss_count = 0
        self._pending = False
        self._newest_t_obs_ns = 0
        if not self._state_ok(q):
            return False, f"still faulted: {self.reason}"
        self._hold_at(q if held is None else held, settle=held is None)
        self.torque_wanted = True
        return True, "HOLD"

    def _hold_at(self, q: np.ndarray, settle: bool) -> None:
        """Hold `q`: what the motors hold (torque on), or where they rest (`settle`: torque
        comes on now, and the arm is kept there: `_settle`)."""
        self.filter.reset(q)
        self.command[:] = self.filter.last
        self.tracker.start_hold(self.command, np.zeros(self.n))
        self._rest[:] = q
        self._rest_offset[:] = 0.0
        self._settling = settle

    # ------------------------------------------------------------------ transitions
    def _enter(self, mode: Mode, reason: str) -> None:
        """The one place a mode changes."""
        if mode == self.mode:
            return
        self.transitions.append(Transition(self.mode, mode, reason))
        self.mode = mode
        self._settling = False  # a plan (TRACK) or a latch takes over from the rest position
        self.reason = reason if mode in LATCHED else None
        if mode == Mode.FAULT:
            self.faults += 1
            self._pending = False
            if self.s.fault_action == "torque_off":
                self.torque_wanted = False
            else:
                self.tracker.start_hold(self.filter.last, self.filter.last_vel)
        elif mode == Mode.ESTOP:
            self.estops += 1
            self._pending = False
            self.torque_wanted = False

    def fault(self, reason: str) -> bool:
        """FAULT (unless already latched); True when this call caused it."""
        if self.mode in LATCHED:
            return False
        self._enter(Mode.FAULT, reason)
        return True

    def still_latched(self, reason: str) -> None:
        """A reset that failed: the mode stays latched, for this reason now (status shows the
        current reason, not the fault the reset started from)."""
        if self.mode in LATCHED:
            self.reason = reason

    def estop(self, reason: str) -> bool:
        if self.mode == Mode.ESTOP:
            return False
        self._enter(Mode.ESTOP, reason)
        return True

    @property
    def latched(self) -> bool:
        return self.mode in LATCHED

    # ------------------------------------------------------------------ bus outcomes
    def bus_ok(self) -> None:
        self._bus_failures = 0

    def bus_failed(self, reason: str) -> None:
        """One failed transaction; `bus_error_threshold` in a row is a FAULT and the bus is
        considered dead (no traffic until reset reopens it)."""
        self._bus_failures += 1
        if self._bus_failures >= self.s.bus_error_threshold:
            self.bus_dead = True
            self.fault(f"bus: {reason}")

    def account_deadline(self, missed: bool) -> None:
        """Sliding-window miss counter; a storm of misses is a FAULT."""
        ring, i = self._miss_ring, self._miss_i
        self._miss_count += missed - ring[i]
        ring[i] = missed
        self._miss_i = i + 1 if i + 1 < len(ring) else 0
        if self._miss_count >= self.s.storm_misses:
            self.fault(f"deadline-miss storm: {self._miss_count} of the last "
                       f"{len(ring)} ticks late")

    @property
    def newest_t_obs_ns(self) -> int:
        """Observation time of the newest plan taken (0: none since start or reset)."""
        return self._newest_t_obs_ns

    def idle_tick(self) -> None:
        """A tick with no measurement to step on (no bus traffic, or the read failed): counted
        in the mode it was spent in."""
        self.mode_ticks[self.mode] += 1

    # ------------------------------------------------------------------ controlled stop
    def start_brake(self) -> bool:
        """Controlled stop: brake from the last command to rest at `hold_decel`. False when
        the core may not move the motors (latched, or the bus is dead); then write nothing."""
        if self.bus_dead or self.latched:
            return False
        self.tracker.start_hold(self.filter.last, self.filter.last_vel)
        return True

    def brake_step(self) -> None:
        """The next braking command into `command` (one per tick after `start_brake`)."""
        self.filter.apply(self.tracker.hold_command(), self.command)

    # ------------------------------------------------------------------ plans
    def offer_plan(self, waypoints: np.ndarray, dt_s: float, t_obs_ns: int, now_ns: int) -> None:
        """Validate a decoded plan; keep it as the newest. Raises PlanRejected(kind)."""
        self.plan_bounds.check(waypoints, dt_s)
        age_ns = now_ns - t_obs_ns
        if age_ns < -FUTURE_TOLERANCE_NS:
            raise PlanRejected("time", f"observation {-age_ns / 1e6:.1f} ms in the future")
        if age_ns > self.plan_timeout_ns:
            self.last_stale_age_ns = age_ns  # for the shell's rate-limited log line
            raise PlanRejected("stale", f"observation {age_ns / 1e6:.0f} ms old, older than "
                                        f"the plan timeout")
        if t_obs_ns <= self._newest_t_obs_ns - FUTURE_TOLERANCE_NS:
            raise PlanRejected("replay", "observation older than the plan already taken")
        t_now = (now_ns - self.epoch_ns) / 1e9
        plan = Plan(waypoints, float(dt_s), (t_obs_ns - self.epoch_ns) / 1e9, t_now)
        self._newest_t_obs_ns = max(self._newest_t_obs_ns, t_obs_ns)
        self.plans_accepted += 1
        if self.mode in (Mode.HOLD, Mode.TRACK):
            # the expensive part (sampling the new reference) here, between ticks; the tick
            # that takes the plan swaps a pointer
            t_next = max(self._last_t + self.s.tick_s, t_now)
            self.tracker.prepare(plan, t_next)
            self._pending = True

    def reject(self, kind: str) -> None:
        self.plans_rejected[kind] += 1

    # ------------------------------------------------------------------ the tick
    def step(self, now_ns: int, q: np.ndarray, dq: np.ndarray) -> bool:
        """One tick on a fresh measurement. Returns True when `command` must be written."""
        self.mode_ticks[self.mode] += 1
        self._state_ok(q, dq)
        if self.mode == Mode.ESTOP or (self.mode == Mode.FAULT
                                       and self.s.fault_action == "torque_off"):
            return False
        t = self._last_t = (now_ns - self.epoch_ns) / 1e9
        if self._pending:
            if self.mode in (Mode.HOLD, Mode.TRACK):
                self.tracker.take_prepared()
            self._pending = False
        if self.mode == Mode.FAULT:
            self._desired[:] = self.tracker.hold_command()
        else:
            self._track_or_hold(now_ns, t, q, dq)
        try:
            self.filter.apply(self._desired, self.command)
        except NonFiniteCommand:
            self.fault("non-finite command (from the plan or the residual)")
            self.command[:] = self.filter.last  # hold the last finite command
        return True

    def slack(self) -> None:
        """Between ticks, when there is time: refill a reference table that runs low."""
        if self.mode == Mode.TRACK:
            self.tracker.refill(self._last_t + self.s.tick_s)

    def _track_or_hold(self, now_ns: int, t: float, q: np.ndarray, dq: np.ndarray) -> None:
        ref = self.tracker.reference
        age_ok = now_ns - self._newest_t_obs_ns < self.plan_timeout_ns
        fresh = ref.has_plan and age_ok and not ref.expired(t)
        if self.mode == Mode.TRACK and not fresh:
            self._enter(Mode.HOLD, "plan stale: no plan newer than the plan timeout"
                        if not age_ok else "plan ran out")
            self.tracker.start_hold(self.filter.last, self.filter.last_vel)
        elif self.mode == Mode.HOLD and fresh:
            self._enter(Mode.TRACK, "fresh plan")
            if not self.first_track_ns:
                self.first_track_ns = now_ns
        if self.mode == Mode.TRACK:
            self.tracker.track_command(t, q, dq, self._desired)
        else:
            self._desired[:] = self.tracker.hold_command()
            if self._settling:
                self._settle(q)

    def _settle(self, q: np.ndarray) -> None:
        """HOLD after torque came on where the arm rested (start, or reset out of a torque-off
        FAULT/ESTOP): a position servo settles at its goal less its load over its gain, so
        holding the measured position lets a loaded arm sag by a few ticks. The goal is moved
        by the integral of (rest - measured) until the arm stays where it rested, within the
        encoder's resolution; it ends when the mode changes."""
        err = self._rest_err
        np.subtract(self._rest, q, out=err)
        err *= self.s.tick_s / SETTLE_TIME_S
        self._rest_offset += err
        np.clip(self._rest_offset, -SETTLE_MAX_RAD, SETTLE_MAX_RAD, out=self._rest_offset)
        self._desired += self._rest_offset

    def _state_ok(self, q: np.ndarray, dq: np.ndarray | None = None) -> bool:
        """A non-finite or out-of-limits measurement is a FAULT naming the joint."""
        total = np.add.reduce(q) + (np.add.reduce(dq) if dq is not None else 0.0)
        if not math.isfinite(total):
            self.fault("non-finite state from the bus")
            return False
        bad = self._bad
        np.less(q, self._state_lo, out=bad)
        np.greater(q, self._state_hi, out=self._bad2)
        bad |= self._bad2
        if np.logical_or.reduce(bad):
            j = int(np.argmax(bad))
            self.fault(f"state outside limits: {self.s.joints[j]} at {q[j]:.3f} rad "
                       f"(limits [{self.s.pos_min[j]:.3f}, {self.s.pos_max[j]:.3f}] "
                       f"± {self.s.state_margin})")
            return False
        return True

    # ------------------------------------------------------------------ live tuning
    def tune(self, s: CoreSettings) -> None:
        """Take the tunable settings of `s` (TUNABLE_SETTINGS); any other difference from the
        running settings is structural and refused, naming the settings."""
        structural = [n for n in self.s.differences(s) if n not in TUNABLE_SETTINGS]
        if structural:
            raise ValueError(f"not live-tunable, restart needed: {', '.join(structural)}")
        ref = self.tracker.reference
        ref.blend_s = s.blend_s
        if ref.strategy != s.strategy:
            ref.strategy = s.strategy
            ref.clear()
        tr = self.tracker
        tr.use_residual = s.residual and tr.model is not None
        tr.residual_max, tr.residual_filter_s = s.residual_max, s.residual_filter_s
        tr.brake.decel = s.hold_decel
        self.plan_timeout_ns = round(s.plan_timeout_s * 1e9)
        self.s = s
