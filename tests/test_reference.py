"""Plan interpolation, latency compensation and blend continuity."""

import numpy as np
import pytest

from runtime.follower.reference import ReferenceGenerator
from runtime.follower.tracking import Tracker
from runtime.model.plan import Plan

D = 6
TICK = 0.002


def _ramp(start: float, slope: float, h: int = 10, dt: float = 0.1) -> np.ndarray:
    return start + slope * dt * (np.arange(h) + 1)[:, None] * np.ones(D)


def test_plan_passes_through_its_waypoints() -> None:
    w = np.random.default_rng(1).normal(size=(10, D))
    plan = Plan(w, 0.1, t_obs=5.0, t_recv=5.0)
    times = 5.0 + 0.1 * (np.arange(10) + 1)
    pos, vel = np.zeros((10, D)), np.zeros((10, D))
    plan.sample(times, pos, vel)
    np.testing.assert_allclose(pos, w, atol=1e-12)


def test_latency_compensation_skips_the_elapsed_part() -> None:
    """A plan computed from an observation 150 ms ago is evaluated 150 ms into the chunk."""
    w = _ramp(0.0, 1.0)  # 1 rad/s ramp from the observation time
    ref = ReferenceGenerator(D, "switch")
    ref.add_plan(Plan(w, 0.1, t_obs=10.0, t_recv=10.15), t_now=10.15)
    pos, vel = np.zeros((1, D)), np.zeros((1, D))
    ref.evaluate(np.array([10.15]), pos, vel)
    np.testing.assert_allclose(pos[0], 0.15, atol=1e-9)
    np.testing.assert_allclose(vel[0], 1.0, atol=1e-9)


def _run(strategy: str, tick: float = TICK) -> tuple[np.ndarray, np.ndarray]:
    """Commanded positions and reference velocities over 2 s with a new plan every 200 ms
    that disagrees with the previous one (offset + other slope), as an imperfect planner's."""
    ref = ReferenceGenerator(D, strategy, 0.08)
    tr = Tracker(D, tick, ref)
    tr.start_hold(np.zeros(D), np.zeros(D))
    out, q = np.zeros(D), np.zeros(D)
    rng = np.random.default_rng(0)
    pos, vel = [], []
    every = round(0.2 / tick)
    for i in range(round(2.0 / tick)):
        t = i * tick
        if i % every == 0:
            w = _ramp(0.02 * rng.normal() + 0.3 * t, 0.3 + 0.2 * rng.normal())
            tr.add_plan(Plan(w, 0.1, t_obs=t - 0.05, t_recv=t), t)
        tr.track_command(t, q, q, out)
        pos.append(out.copy())
        vel.append(tr.ref_vel.copy())
    return np.array(pos), np.array(vel)


def _max_step(a: np.ndarray) -> float:
    return float(np.abs(np.diff(a, axis=0)).max())


def test_blend_is_continuous_in_position_and_velocity() -> None:
    """Continuity: the largest per-tick change shrinks with the tick (no jump remains)."""
    pos_a, vel_a = _run("blend", 0.002)
    pos_b, vel_b = _run("blend", 0.0005)
    assert _max_step(pos_b) < 0.3 * _max_step(pos_a)
    assert _max_step(vel_b) < 0.3 * _max_step(vel_a)


@pytest.mark.parametrize("strategy", ["switch", "average", "broker"])
def test_peer_strategies_jump_at_boundaries(strategy: str) -> None:
    """A jump does not shrink with the tick, and is larger than blend's per-tick change."""
    _, vel_a = _run(strategy, 0.002)
    _, vel_b = _run(strategy, 0.0005)
    assert _max_step(vel_b) > 0.5 * _max_step(vel_a)
    _, vel_blend = _run("blend", 0.0005)
    assert _max_step(vel_b) > 3 * _max_step(vel_blend)


def test_broker_finishes_the_chunk_before_taking_the_next() -> None:
    ref = ReferenceGenerator(D, "broker")
    ref.add_plan(Plan(_ramp(0.0, 1.0), 0.1, 0.0, 0.0), 0.0)
    ref.add_plan(Plan(_ramp(5.0, 0.0), 0.1, 0.2, 0.2), 0.2)  # must wait until t=1.0
    pos, vel = np.zeros((1, D)), np.zeros((1, D))
    ref.evaluate(np.array([0.5]), pos, vel)
    assert pos[0, 0] == pytest.approx(0.5)
    ref.evaluate(np.array([1.05]), pos, vel)
    assert pos[0, 0] == pytest.approx(5.0)


def test_expired_plan_is_reported_and_ends_at_rest() -> None:
    ref = ReferenceGenerator(D, "blend")
    ref.add_plan(Plan(_ramp(0.0, 1.0), 0.1, 0.0, 0.0), 0.0)
    assert not ref.expired(0.9)
    assert ref.expired(1.01)
    pos, vel = np.zeros((1, D)), np.zeros((1, D))
    ref.evaluate(np.array([1.5]), pos, vel)
    np.testing.assert_allclose(vel, 0.0)
    np.testing.assert_allclose(pos, 1.0)


def test_unknown_strategy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown chunk strategy"):
        ReferenceGenerator(D, "teleport")


def test_first_plan_is_blended_in_from_the_hold_position() -> None:
    ref = ReferenceGenerator(D, "blend", 0.08)
    tr = Tracker(D, TICK, ref)
    tr.start_hold(np.full(D, 0.2), np.zeros(D))
    # far from the hold position
    tr.add_plan(Plan(_ramp(1.0, 0.0), 0.1, t_obs=0.0, t_recv=0.0), 0.0)
    out = np.zeros(D)
    tr.track_command(0.0, out, out, out)
    assert out[0] == pytest.approx(0.2, abs=1e-3)  # starts where the arm is commanded
