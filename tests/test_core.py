"""The follower core (runtime/follower/core.py): the state machine, plan validation, start and reset
without a jump, and an allocation-free steady-state tick -- the class the follower process,
the lockstep eval and the bench all drive."""

from __future__ import annotations

import gc
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from onnx_bundle import make_bundle

from runtime.config import load_config
from runtime.follower.core import SETTLE_MAX_RAD, CoreSettings, FollowerCore, PlanRejected
from runtime.follower.safety import Mode
from runtime.model.bundle import load_bundle
from runtime.model.residual import residual_model

REPO = Path(__file__).resolve().parents[1]
N = 6
TICK_NS = 2_000_000
MS = 1_000_000


def _settings(**over: object) -> CoreSettings:
    cfg = load_config(REPO / "configs/sim.yaml")
    return replace(CoreSettings.from_config(cfg), **over)  # type: ignore[arg-type]


def _core(**over: object) -> FollowerCore:
    core = FollowerCore(_settings(**over))
    core.start(0, np.zeros(N), held=None)
    return core


def _ramp(q0: float = 0.0, h: int = 10) -> np.ndarray:
    w = np.full((h, N), q0)
    w[:, 0] += 0.02 * (np.arange(h) + 1)
    return w


def _run(core: FollowerCore, t0: int, ticks: int, plan_every: int = 0,
         q: np.ndarray | None = None) -> int:
    q = np.zeros(N) if q is None else q
    dq = np.zeros(N)
    t = t0
    for i in range(ticks):
        if plan_every and i % plan_every == 0:
            core.offer_plan(_ramp(), 0.1, t - 5 * MS, t)
        core.step(t, q, dq)
        t += TICK_NS
    return t


def _modes(core: FollowerCore) -> list[tuple[str, str]]:
    return [(tr.new.name, tr.reason) for tr in core.transitions]


def test_start_commands_what_the_motors_hold_not_what_they_measure() -> None:
    core = FollowerCore(_settings())
    measured, held = np.full(N, 0.10), np.full(N, 0.13)  # a servo sagging under load
    core.start(0, measured, held=held)
    np.testing.assert_array_equal(core.command, held)
    assert core.mode == Mode.HOLD and core.torque_wanted
    assert core.step(TICK_NS, measured, np.zeros(N))
    np.testing.assert_allclose(core.command, held, atol=1e-12)  # holds, does not drift to q


def test_start_without_a_held_goal_commands_the_measured_position() -> None:
    core = FollowerCore(_settings())
    q = np.linspace(-0.2, 0.2, N)
    core.start(0, q, held=None)
    np.testing.assert_array_equal(core.command, q)


@pytest.mark.parametrize(("latch", "mode"), [("FAULT: bus: gone", Mode.FAULT),
                                             ("ESTOP: cli", Mode.ESTOP)])
def test_a_latch_from_before_a_restart_comes_back(latch: str, mode: Mode) -> None:
    core = FollowerCore(_settings())
    core.start(0, np.zeros(N), held=np.zeros(N), latched=latch)
    assert core.mode == mode and "latched before restart" in (core.reason or "")
    assert core.torque_wanted == (mode == Mode.FAULT)  # fault_action: hold
    again = FollowerCore(_settings())  # a second restart: the prefix is not repeated
    again.start(0, np.zeros(N), held=np.zeros(N), latched=f"{mode.name}: {core.reason}")
    assert again.reason == core.reason


def test_hold_track_hold_on_plan_timeout_with_reasons() -> None:
    core = _core(plan_timeout_s=0.1)
    t = _run(core, TICK_NS, 50, plan_every=25)
    assert core.mode == Mode.TRACK
    _run(core, t, 100)  # no plans for 200 ms > 100 ms timeout
    assert core.mode == Mode.HOLD
    assert _modes(core) == [("HOLD", "started"), ("TRACK", "fresh plan"),
                            ("HOLD", "plan stale: no plan newer than the plan timeout")]


def test_fault_latches_until_reset_and_reset_holds_the_held_goal() -> None:
    core = _core()
    _run(core, TICK_NS, 20, plan_every=10)
    assert core.fault("motor fault: shoulder overload")
    assert not core.fault("again")  # only the first fault counts
    t = _run(core, 100 * TICK_NS, 20, plan_every=5)
    assert core.mode == Mode.FAULT and core.faults == 1
    assert core.estop("button") and core.mode == Mode.ESTOP and not core.torque_wanted
    assert not core.step(t, np.zeros(N), np.zeros(N))  # ESTOP: nothing is written
    held = np.full(N, 0.05)
    ok, text = core.reset(np.zeros(N), held)
    assert ok and text == "HOLD" and core.mode == Mode.HOLD and core.torque_wanted
    np.testing.assert_array_equal(core.command, held)


def _sagging_servo(core: FollowerCore, q: np.ndarray, sag: np.ndarray, t: int,
                   ticks: int) -> int:
    """A position servo under a constant load, first order (20 ms): it settles at the goal
    less its load over its gain (`sag`)."""
    for _ in range(ticks):
        if core.step(t, q, np.zeros(N)):
            q += 0.1 * (core.command - sag - q)
        t += TICK_NS
    return t


def test_torque_on_where_the_arm_rests_holds_it_there_not_sagging() -> None:
    """Reset out of ESTOP (torque off): torque comes on at the measured position, and a loaded
    servo would settle 3 mrad below it; the core moves the goal until the arm stays where it
    rested. An arm pushed far away moves the goal by no more than SETTLE_MAX_RAD."""
    core = _core()
    assert core.estop("button")
    rest = np.linspace(-0.3, 0.3, N)
    sag = np.array([0.0, 0.003, -0.003, 0.002, 0.0, 0.001])
    ok, _ = core.reset(rest, None)
    assert ok and core.mode == Mode.HOLD
    q = rest.copy()
    t = _sagging_servo(core, q, sag, TICK_NS, 2000)  # 4 s
    assert np.abs(q - rest).max() < 1e-4, f"sagged {np.round((q - rest) * 1e3, 2)} mrad"
    pushed = rest - 0.5  # someone holds the arm away: the goal moves a bounded amount
    for _ in range(2000):
        core.step(t, pushed, np.zeros(N))
        t += TICK_NS
    assert np.abs(core.command - rest).max() <= SETTLE_MAX_RAD + 1e-12
    held = np.full(N, 0.05)  # the motors hold their goal (torque stayed on): no settling
    core.fault("x")
    core.reset(np.zeros(N), held)
    _sagging_servo(core, np.zeros(N), sag, t, 500)
    np.testing.assert_allclose(core.command, held, atol=1e-12)


def test_reset_refuses_a_state_still_outside_limits() -> None:
    core = _core()
    core.fault("x")
    q = np.zeros(N)
    q[1] = 9.0
    ok, text = core.reset(q, None)
    assert not ok and "shoulder" in text and core.mode == Mode.FAULT


def test_state_outside_limits_names_the_joint() -> None:
    core = _core()
    q = np.zeros(N)
    q[2] = -3.0
    core.step(TICK_NS, q, np.zeros(N))
    assert core.mode == Mode.FAULT and "elbow at -3.000" in (core.reason or "")


def test_torque_off_fault_action_writes_nothing() -> None:
    core = _core(fault_action="torque_off")
    core.fault("bus")
    assert not core.torque_wanted
    assert not core.step(TICK_NS, np.zeros(N), np.zeros(N))


@pytest.mark.parametrize(
    ("w", "dt", "age_ms", "kind"),
    [
        (_ramp(), 5e-324, 5, "dt"),  # passed before, then inf -> NaN -> FAULT
        (_ramp(), 0.0005, 5, "dt"),
        (_ramp(), 2.0, 5, "dt"),
        (_ramp(), 0.1, 900, "stale"),  # older than the plan timeout
        (_ramp(), 0.1, -50, "time"),  # from the future on a one-clock host
        (np.zeros((10, 5)), 0.1, 5, "shape"),
        (np.zeros((1, N)), 0.1, 5, "shape"),
        (np.zeros((300, N)), 0.1, 5, "shape"),
        (_ramp(2.9), 0.1, 5, "limits"),
    ],
)
def test_plan_validation(w: np.ndarray, dt: float, age_ms: int, kind: str) -> None:
    core = _core()
    now = 10_000 * MS
    with pytest.raises(PlanRejected) as err:
        core.offer_plan(w, dt, now - age_ms * MS, now)
    assert err.value.kind == kind
    assert core.plans_accepted == 0


def test_an_older_observation_than_the_taken_plan_is_a_replay() -> None:
    core = _core()
    now = 10_000 * MS
    core.offer_plan(_ramp(), 0.1, now - 10 * MS, now)
    with pytest.raises(PlanRejected) as err:
        core.offer_plan(_ramp(), 0.1, now - 100 * MS, now + MS)
    assert err.value.kind == "replay"


def test_bus_failures_in_a_row_fault_and_mark_the_bus_dead() -> None:
    core = _core(bus_error_threshold=3)
    core.bus_failed("timeout")
    core.bus_failed("timeout")
    core.bus_ok()  # a good read in between: the count starts again
    core.bus_failed("timeout")
    core.bus_failed("timeout")
    assert core.mode == Mode.HOLD
    core.bus_failed("no reply from shoulder (id 2)")
    assert core.mode == Mode.FAULT and core.bus_dead
    assert core.reason == "bus: no reply from shoulder (id 2)"


def test_deadline_storm_uses_a_sliding_window() -> None:
    core = _core(storm_misses=3, storm_window=10)
    for missed in [True] + [False] * 9 + [True] + [False] * 9:
        core.account_deadline(missed)  # one miss per window
    assert core.mode == Mode.HOLD
    for _ in range(3):  # with the miss 10 ticks ago gone, three in a row make the storm
        core.account_deadline(True)
    assert core.mode == Mode.FAULT and "deadline-miss storm" in (core.reason or "")


class _NanResidual:
    lookahead, lookahead_dt = 8, 0.02

    def residual(self, ref: np.ndarray, q: np.ndarray, dq: np.ndarray) -> np.ndarray:
        return np.full(N, np.nan)


def test_a_non_finite_residual_faults_and_holds_the_last_finite_command() -> None:
    core = FollowerCore(_settings(), _NanResidual())
    core.start(0, np.zeros(N), held=None)
    _run(core, TICK_NS, 30, plan_every=10)
    assert core.mode == Mode.FAULT and "non-finite command" in (core.reason or "")
    assert np.isfinite(core.command).all()


def test_steady_state_tick_allocates_nothing(tmp_path: Path) -> None:
    """10,000 ticks with a plan every 100 ticks and the ONNX follower in the loop: no net
    growth of Python's allocated blocks (arrays, views, Plans come and go; nothing stays)."""
    bundle = load_bundle(make_bundle(tmp_path / "b", gain=0.3))
    model = residual_model(bundle, list(bundle.contract.action_joints))
    core = FollowerCore(_settings(), model)
    core.start(0, np.zeros(N), held=None)
    q, dq = np.zeros(N), np.zeros(N)
    plans = [_ramp() for _ in range(4)]

    def drive(t: int, ticks: int) -> int:
        for i in range(ticks):
            if i % 100 == 0:
                core.offer_plan(plans[(i // 100) % 4], 0.1, t - 5 * MS, t)
            core.step(t, q, dq)
            core.account_deadline(False)
            core.slack()
            t += TICK_NS
        return t

    t = drive(TICK_NS, 2000)  # warm up: scratch buffers, the first plans
    assert core.mode == Mode.TRACK
    gc.collect()
    before = sys.getallocatedblocks()
    drive(t, 10_000)
    gc.collect()
    grown = sys.getallocatedblocks() - before
    assert core.mode == Mode.TRACK and core.plans_accepted > 100
    # A per-tick leak would leave >= 10,000 blocks; up to a couple of hundred either way are
    # interpreter bookkeeping (free lists, caches) that moves with whatever ran before.
    assert grown < 200, f"{grown} blocks left allocated by 10,000 ticks"


def test_tune_takes_a_settings_object_and_refuses_structural_changes() -> None:
    core = _core()
    tuned = replace(core.s, strategy="switch", blend_s=0.02, residual_max=0.01,
                    hold_decel=2.0, plan_timeout_s=0.2)
    core.tune(tuned)
    assert core.s is tuned and core.plan_timeout_ns == 200 * MS
    assert core.tracker.reference.strategy == "switch"
    assert core.tracker.reference.blend_s == 0.02 and core.tracker.brake.decel == 2.0
    with pytest.raises(ValueError, match="restart needed: state_margin, fault_action"):
        core.tune(replace(tuned, state_margin=0.5, fault_action="torque_off"))
    assert core.s is tuned


def test_every_live_key_of_the_config_maps_to_a_tunable_core_setting() -> None:
    """`duet set KEY` retunes the core from the whole config: a key in config.TUNABLES that
    moved a structural core setting would be refused mid-run."""
    from runtime.config import TUNABLES
    from runtime.follower.core import TUNABLE_SETTINGS

    cfg = load_config(REPO / "configs/sim.yaml")
    base = CoreSettings.from_config(cfg)
    changed = {"follower.blend_ms": 20.0, "follower.residual": False,
               "follower.residual_max": 0.01, "follower.residual_filter_ms": 10.0,
               "follower.hold_decel": 2.0, "follower.plan_timeout_ms": 200.0,
               "follower.chunk_strategy": "switch"}
    assert set(changed) == TUNABLES
    for key, value in changed.items():
        setattr(cfg.follower, key.split(".", 1)[1], value)
        moved = set(base.differences(CoreSettings.from_config(cfg)))
        assert moved and moved <= TUNABLE_SETTINGS, key
        base = CoreSettings.from_config(cfg)


def test_controlled_stop_brakes_to_rest_unless_latched() -> None:
    core = _core()
    t = _run(core, TICK_NS, 100, plan_every=25)
    assert core.mode == Mode.TRACK and core.newest_t_obs_ns > 0
    assert core.start_brake()
    last = core.command.copy()
    for _ in range(400):
        core.brake_step()
        step, last = np.abs(core.command - last).max(), core.command.copy()
    assert step < 1e-9  # at rest
    core.estop("test")
    assert not core.start_brake()
    core.reset(np.zeros(N), None)
    assert core.newest_t_obs_ns == 0 and t > 0
