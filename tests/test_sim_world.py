"""SimWorld: the model, the servo law, overload protection, IK, rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from runtime.config import load_config
from sim.actuators import HW_OVERLOAD
from sim.robot import default_robot
from sim.world import ArmKinematics, SimWorld

HOME_Q = default_robot().home
JOINTS = default_robot().joints

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def kin() -> ArmKinematics:
    return ArmKinematics()


def test_model_matches_the_robot_config() -> None:
    cfg = load_config(REPO / "configs" / "sim.yaml")
    world = SimWorld(physics_hz=500.0)
    assert tuple(cfg.robot.joints) == JOINTS
    assert world.dt == pytest.approx(1 / 500)
    assert world.model.nu == len(JOINTS)
    np.testing.assert_allclose(world.q_min, cfg.robot.limits.position_min)
    np.testing.assert_allclose(world.q_max, cfg.robot.limits.position_max)
    assert np.all((world.q_min < HOME_Q) & (world.q_max > HOME_Q))
    tip = world.fingertip()
    assert 0.15 < tip[2] < 0.3 and 0.15 < tip[0] < 0.35  # above the table, in front


def test_bad_physics_rate_is_rejected() -> None:
    with pytest.raises(ValueError, match="physics_hz"):
        SimWorld(physics_hz=0.0)


def test_position_servo_holds_home_and_tracks_a_step() -> None:
    world = SimWorld()
    act = world.actuators
    act.torque_enabled[:] = True
    world.step(500)
    # a stiff servo: small gravity sag, arm at rest, torque reported
    assert np.abs(world.q() - HOME_Q).max() < 0.05
    assert np.abs(world.dq()).max() < 0.05
    assert np.abs(act.tau[1:3]).max() > 0.1
    np.testing.assert_allclose(act.q, world.q())
    act.goal_q[0] = HOME_Q[0] + 0.5
    world.step(100)
    lag = act.goal_q[0] - world.q()[0]
    world.step(900)
    assert lag > 0.1  # a servo, not a teleport: visible tracking lag after 0.1 s
    assert abs(world.q()[0] - act.goal_q[0]) < 0.01


def test_torque_off_lets_the_arm_fall() -> None:
    world = SimWorld()
    world.step(300)  # torque is off at power-on
    assert np.all(world.actuators.tau == 0.0)
    assert world.q()[1] - HOME_Q[1] > 0.05  # the shoulder drops under gravity


def test_mit_mode_uses_the_commanded_impedance() -> None:
    from sim.actuators import MODE_MIT

    world = SimWorld()
    act = world.actuators
    act.mode[:] = MODE_MIT
    act.torque_enabled[:] = True
    act.goal_q[:] = HOME_Q
    act.kp[:] = 0.0
    act.kd[:] = 0.0
    act.tau_ff[0] = 0.5  # a pure feed-forward torque on the base spins it
    world.step(300)
    assert world.q()[0] > HOME_Q[0] + 0.1
    assert act.tau[0] == pytest.approx(0.5)


def test_sustained_stall_trips_overload_and_disables_torque() -> None:
    world = SimWorld()
    act = world.actuators
    act.torque_enabled[:] = True
    act.goal_q[:] = HOME_Q
    act.goal_q[1] = 1.6  # drive the hand down through the table: the shoulder stalls
    act.goal_q[2] = 2.4
    world.step(1000)
    assert act.hw_error[1] == 0 and act.torque_enabled[1]
    world.step(1500)
    assert act.hw_error[1] & HW_OVERLOAD
    assert not act.torque_enabled[1]
    assert act.tau[1] == 0.0
    assert act.torque_enabled[0] and act.hw_error[0] == 0  # the others keep running


def test_ik_reaches_sampled_targets_pointing_down(kin: ArmKinematics) -> None:
    rng = np.random.default_rng(7)
    for _ in range(25):
        r, bearing = rng.uniform(0.22, 0.46), rng.uniform(-0.8, 0.8)
        target = np.array([r * np.cos(bearing), r * np.sin(bearing), rng.uniform(0.03, 0.16)])
        q = kin.ik(target, kin.seed_for(target))
        assert np.linalg.norm(kin.fingertip(q) - target) < 0.01, target
        assert np.all((q >= kin.q_min) & (q <= kin.q_max))
        # tool axis down: pitch joints sum to pi for this arm
        assert q[1] + q[2] + q[3] == pytest.approx(np.pi, abs=0.02)


def test_ik_rejects_bad_targets(kin: ArmKinematics) -> None:
    with pytest.raises(ValueError, match="finite xyz"):
        kin.ik(np.array([np.nan, 0.0, 0.1]), HOME_Q)


def test_set_joint_state_moves_the_servo_goals_too() -> None:
    world = SimWorld()
    q = HOME_Q + np.array([0.3, 0.1, -0.1, 0.1, 0.2, 0.2])
    world.set_joint_state(q)
    np.testing.assert_allclose(world.q(), q)
    np.testing.assert_allclose(world.actuators.goal_q, q)
    with pytest.raises(ValueError):
        world.set_joint_state(np.zeros(5))


def test_render_shape_and_colours() -> None:
    world = SimWorld()
    world.place_blocks({"red": np.array([0.3, -0.1, 0.025]), "blue": np.array([0.3, 0.1, 0.025])})
    img = world.render()
    assert img.shape == (96, 96, 3) and img.dtype == np.uint8
    r, g, b = (img[..., i].astype(int) for i in range(3))
    assert np.sum((r > 150) & (g < 80) & (b < 80)) >= 6  # the red block is visible
    assert np.sum((b > 150) & (r < 80) & (g < 120)) >= 6  # so is the blue one
    assert np.sum((g > 120) & (r < 80) & (b < 80)) == 0  # green is parked out of view
