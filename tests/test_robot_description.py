"""Robots from a description (docs/your-robot.md): a three-joint arm that exists only as an
MJCF and a config this test writes runs through the sim, the scripted expert and the live
stack, and every description it cannot use is refused naming the config key or MJCF element.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sim_arm import SIM_YAML

from runtime.config import ConfigError, load_config

POINTER_JOINTS = ["turn", "lift", "bend"]
HOME = [0.0, -0.5, 1.5]

POINTER_MJCF = """<mujoco model="pointer3">
  <compiler angle="radian" autolimits="true"/>
  <option timestep="0.001"/>
  <default>
    <!-- links touch the task's blocks (conaffinity), never each other (contype 0) -->
    <geom contype="0" conaffinity="1"/>
  </default>
  <worldbody>
    <site name="overview" pos="{cam_pos}" xyaxes="{cam_xyaxes}"/>
    <body name="base">
      <geom type="cylinder" size="0.05 0.02" pos="0 0 0.02" mass="0.5"/>
      <body name="post" pos="0 0 0.04">
        <joint name="turn" axis="0 0 1" range="-2 2" damping="0.1" armature="0.01"/>
        <geom type="capsule" fromto="0 0 0 0 0 0.15" size="0.02" mass="0.2"/>
        <body name="upper" pos="0 0 0.15">
          <joint name="lift" axis="0 1 0" range="-1.5 1.5" damping="0.1" armature="0.01"/>
          <geom type="capsule" fromto="0 0 0 0.2 0 0" size="0.018" mass="0.1"/>
          <body name="lower" pos="0.2 0 0">
            <joint name="bend" axis="0 1 0" range="-2.5 2.5" damping="0.05" armature="0.005"/>
            <geom type="capsule" fromto="0 0 0 0.2 0 0" size="0.015" mass="0.08"/>
            <site name="tip" pos="0.2 0 0" size="0.005"/>
          </body>
        </body>
      </body>
    </body>
  </worldbody>
  <keyframe>
    <key name="home" qpos="{home}"/>
  </keyframe>
</mujoco>
"""


def _look_at(eye: np.ndarray, target: np.ndarray) -> str:
    """xyaxes of a frame at `eye` whose -z looks at `target`, +y up (a MuJoCo camera)."""
    back = eye - target
    back /= np.linalg.norm(back)
    right = np.cross([0.0, 0.0, 1.0], back)
    right /= np.linalg.norm(right)
    up = np.cross(back, right)
    return " ".join(f"{v:.4f}" for v in (*right, *up))


def pointer_files(tmp: Path, mjcf: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The pointer's MJCF in `tmp` and its config (a dict: tests change it, then write it)."""
    eye, target = np.array([0.9, -0.6, 0.7]), np.array([0.28, 0.0, 0.05])
    text = mjcf if mjcf is not None else POINTER_MJCF.format(
        cam_pos=" ".join(map(str, eye)), cam_xyaxes=_look_at(eye, target),
        home=" ".join(map(str, HOME)))
    (tmp / "pointer3.xml").write_text(text)
    cfg = yaml.safe_load(SIM_YAML.read_text())
    cfg["robot"] = {"name": "pointer3", "joints": POINTER_JOINTS, "limits": {
        "position_min": [-2.0, -1.5, -2.5], "position_max": [2.0, 1.5, 2.5],
        "velocity_max": [3.0] * 3, "accel_max": [100.0] * 3}}
    cfg["bus"]["ids"] = [1, 2, 3]
    cfg["planner"]["cameras"] = {"scene": {"kind": "sim", "site": "overview", "fovy": 50}}
    cfg["bundle"]["path"] = str(tmp / "bundle")
    cfg["sim"]["robot"] = {"mjcf": "pointer3.xml", "end_effector": "tip", "tool_down": False,
                           "gripper": None, "motors": [{"model": "XM430-W350"}] * 3,
                           "workspace": {"radius": [0.22, 0.32], "bearing": [-0.6, 0.6]}}
    return tmp / "pointer3.yaml", cfg


def write(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_the_description_builds_the_model_motors_and_camera(tmp_path: Path) -> None:
    from sim.robot import describe
    from sim.world import SimWorld

    path, cfg = pointer_files(tmp_path)
    robot = describe(load_config(write(path, cfg)))
    assert robot.joints == tuple(POINTER_JOINTS) and robot.mjcf == tmp_path / "pointer3.xml"
    np.testing.assert_allclose(robot.home, HOME)
    assert robot.gripper is None and list(robot.arm) == [0, 1, 2] and robot.yaw == 0
    np.testing.assert_allclose(robot.motors.torque_max, 4.1)  # XM430-W350 stall torque
    world = SimWorld(robot=robot)
    model = world.model
    assert model.nu == 3 and [model.actuator(k).name for k in range(3)] == POINTER_JOINTS
    assert model.camera("scene").bodyid == 0  # mounted on the world site "overview"
    image = world.render("scene", 96, 96)
    red = (image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 80)
    assert red.sum() > 5  # the task scene's blocks are in the mounted camera's view
    # the motors hold the home pose against gravity, with the XM430's factory gains
    world.actuators.torque_enabled[:] = True
    world.step(500)
    assert np.abs(world.q() - HOME).max() < 0.05


def test_the_expert_touches_blocks_with_a_three_joint_arm(tmp_path: Path) -> None:
    """IK from the MJCF's end-effector site (position only: three joints cannot also point the
    tool), the task's blocks in the configured workspace, in lockstep through the follower core."""
    from policy.rollout import LoopSettings, run_episode
    from sim.expert import expert_chunk
    from sim.robot import describe
    from sim.task import Episode
    from sim.world import SimWorld

    path, cfg = pointer_files(tmp_path)
    config = load_config(write(path, cfg))
    robot = describe(config)
    world = SimWorld(robot=robot)
    settings = LoopSettings.from_config(config)

    def plan(world: SimWorld, history: Any, task: Any) -> tuple[np.ndarray, float]:
        return expert_chunk(world, task.remaining(), history.latest("q"), 10, 0.1), 0.0

    episode = next(e for e in (Episode(s, 1.0, workspace=robot.workspace) for s in range(50)))
    result = run_episode(world, episode, plan, None, settings, start_q=robot.home)
    assert result.success and result.touched == 2, result


def test_the_so101_holds_home_and_its_expert_touches_blocks() -> None:
    """The shipped SO-101-class arm (sim/assets/so101.xml on six STS3215): the servos' factory
    gains hold the power-on pose against gravity, the camera on its site sees the blocks, and
    the scripted expert touches two blocks with the jaws pointing down, in lockstep."""
    from sim_arm import REPO

    from policy.rollout import LoopSettings, run_episode
    from sim.expert import expert_chunk
    from sim.robot import describe
    from sim.task import Episode
    from sim.world import SimWorld

    config = load_config(REPO / "configs" / "so101_sim.yaml")
    robot = describe(config)
    assert robot.joints == ("shoulder_pan", "shoulder_lift", "elbow_flex", "wrist_flex",
                            "wrist_roll", "gripper") and robot.gripper == 5
    np.testing.assert_allclose(robot.motors.torque_max, 1.91)  # STS3215 stall at 7.4 V
    world = SimWorld(robot=robot)
    world.actuators.torque_enabled[:] = True
    world.step(1000)
    assert np.abs(world.q() - robot.home).max() < 0.02  # sag under gravity, P gain alone
    image = world.render("scene", 96, 96)
    assert ((image[..., 0] > 150) & (image[..., 1] < 80) & (image[..., 2] < 80)).sum() > 5

    def plan(world: SimWorld, history: Any, task: Any) -> tuple[np.ndarray, float]:
        return expert_chunk(world, task.remaining(), history.latest("q"), 10, 0.1), 0.0

    episode = Episode(0, 1.0, workspace=robot.workspace)
    result = run_episode(world, episode, plan, None, LoopSettings.from_config(config),
                         start_q=robot.home)
    assert result.success and result.touched == 2, result


@pytest.mark.parametrize(("change", "says"), [
    (lambda c, m: c["robot"].update(joints=["turn", "lift", "wrist"]),
     ["robot.joints.2", "'wrist'", "pointer3.xml", "turn, lift, bend"]),
    (lambda c, m: c["sim"]["robot"].update(end_effector="tool"),
     ["sim.robot.end_effector", "'tool'", "tip"]),
    (lambda c, m: c["planner"]["cameras"]["scene"].update(site="nowhere"),
     ["planner.cameras.scene.site", "'nowhere'", "overview"]),
    (lambda c, m: c["planner"]["cameras"]["scene"].pop("site"),
     ["planner.cameras.scene", "no camera 'scene'"]),
    (lambda c, m: c["sim"]["robot"]["motors"].__setitem__(1, {"model": "DM-J4310-2EC"}),
     ["sim.robot.motors.1.model", "mit_can", "dynamixel"]),
    (lambda c, m: c["sim"]["robot"]["motors"].__setitem__(1, {"model": "XL-999"}),
     ["sim.robot.motors.1.model", "XL-999", "XM430-W350"]),
    (lambda c, m: c["robot"]["limits"]["position_max"].__setitem__(2, 3.0),
     ["robot.limits", "'bend'", "[-2.5, 2.5]"]),
    (lambda c, m: c["sim"]["robot"].update(tool_down=True),
     ["sim.robot.tool_down", "3 arm joints"]),
    (lambda c, m: c["sim"]["robot"].update(gripper="claw"),
     ["sim.robot.gripper", "'claw'"]),
    (lambda c, m: c["sim"]["robot"].update(mjcf="missing.xml"),
     ["sim.robot.mjcf", "missing.xml"]),
    (lambda c, m: m.write_text("<mujoco><worldbody><body></mujoco>"),
     ["sim.robot.mjcf", "pointer3.xml"]),
])
def test_a_description_that_cannot_be_used_names_its_key(tmp_path: Path, change: Any,
                                                         says: list[str]) -> None:
    from sim.robot import describe

    path, cfg = pointer_files(tmp_path)
    cfg = copy.deepcopy(cfg)
    change(cfg, tmp_path / "pointer3.xml")
    with pytest.raises(ConfigError) as err:
        describe(load_config(write(path, cfg)))
    for text in says:
        assert text in str(err.value), str(err.value)


def test_a_motor_list_of_the_wrong_length_is_refused_by_the_config(tmp_path: Path) -> None:
    path, cfg = pointer_files(tmp_path)
    cfg["sim"]["robot"]["motors"] = cfg["sim"]["robot"]["motors"][:2]
    with pytest.raises(ConfigError, match=r"sim\.robot\.motors has 2 entries"):
        load_config(write(path, cfg))


def test_gear_play_lets_the_joint_sag_inside_the_dead_band(tmp_path: Path) -> None:
    """Backlash from the config: the lift joint sags further under gravity by about half the
    play (the motor's loop sees the joint only once the slack is taken up)."""
    from sim.robot import describe
    from sim.world import SimWorld

    sag = []
    for play in (0.0, 0.06):
        path, cfg = pointer_files(tmp_path)
        cfg["sim"]["robot"]["motors"][1] = {"model": "XM430-W350", "backlash": play}
        world = SimWorld(robot=describe(load_config(write(path, cfg))))
        world.actuators.torque_enabled[:] = True
        world.step(1500)
        sag.append(world.q()[1] - HOME[1])
    assert 0.02 < sag[1] - sag[0] < 0.035, sag


def test_a_motor_run_hot_latches_overheating_and_lets_go(tmp_path: Path) -> None:
    from sim.actuators import HW_OVERHEATING
    from sim.robot import describe
    from sim.world import SimWorld

    path, cfg = pointer_files(tmp_path)
    # a motor that heats in seconds: held at its limit, it trips
    cfg["sim"]["robot"]["motors"][0] = {"model": "XM430-W350", "heat_tau_s": 0.5,
                                        "heat_rise_c": 20.0, "temperature_limit_c": 40.0,
                                        "torque_max": 0.3}
    world = SimWorld(robot=describe(load_config(write(path, cfg))))
    act = world.actuators
    act.torque_enabled[:] = True
    act.goal_q[0] = 1.5  # far away: the turn motor pushes at its limit (no gravity on it)
    world.step(200)  # 0.2 s: 30 + 20 (1 - exp(-0.4)) = 36.6 °C
    assert act.temperature_c[0] > 31.0 and act.hw_error[0] == 0
    world.step(1200)
    assert act.hw_error[0] & HW_OVERHEATING and not act.torque_enabled[0]
    assert act.temperature_c[1] < 40.0 and act.torque_enabled[1]


@pytest.mark.system
def test_a_three_joint_robot_from_its_description_runs_through_the_live_stack(
        tmp_path: Path) -> None:
    """`duet run`'s supervisor starts the sim (MuJoCo from the MJCF, XM430s emulated on a pty,
    the scene camera on its site), the follower and a planner whose plans sweep `turn`: the
    follower tracks them and the simulated arm moves."""
    from onnx_bundle import make_bundle
    from stack import Stack

    path, cfg = pointer_files(tmp_path)
    bundle = make_bundle(tmp_path / "bundle", joints=POINTER_JOINTS)
    with Stack(tmp_path, bundle, config=str(write(path, cfg))) as stack:
        stack.wait_mode("TRACK", 30.0)
        q = stack.q()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 20.0 and q[0] < HOME[0] + 0.3:
            q = stack.q()
        assert q.shape == (3,) and q[0] > HOME[0] + 0.3, q
        truth = np.array(stack.sim_fault("state")["result"]["q"])
        assert truth.shape == (3,)
        # lift and bend are planned where they are (the test planner adds its sweep to the
        # measured q), so a joint held against gravity creeps by its sag with each plan; a
        # joint mapping error would move them as far as turn
        moved = np.abs(truth - HOME)
        assert moved[1:].max() < 0.5 * moved[0], truth
        status = stack.control("status")
        assert status["ok"], status
    assert stack.codes["follower"] == 0 and stack.codes["sim"] == 0, stack.codes


def test_every_shipped_sim_config_describes_its_robot() -> None:
    from sim_arm import REPO

    from sim.robot import describe

    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        if cfg.sim is not None and cfg.sim.enabled:
            robot = describe(cfg)
            assert robot.joints == tuple(cfg.robot.joints), path
            assert (robot.q_min < robot.home).all() and (robot.home < robot.q_max).all(), path


@pytest.mark.slow
def test_arm7_trains_exports_and_evaluates_from_its_config(tmp_path: Path) -> None:
    """The 7-DoF arm on MIT CAN: `duet train --config` makes data with the scripted expert on
    its description and writes a contract with its joints, `duet export` bundles the pair
    through it, and `duet eval` runs the bundle on that robot (smoke sizes: the pipeline, not
    the planner's skill)."""
    import json
    import os
    import subprocess
    import sys

    from sim_arm import REPO

    from runtime.model.bundle import load_bundle

    config = REPO / "configs" / "arm7_can_sim.yaml"
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(REPO))

    def duet(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=tmp_path,
                              env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]

    ck = tmp_path / "ck"
    duet("train", "--smoke", "--config", str(config), "--out", str(ck), "--data-dir",
         str(tmp_path / "data"), "--threads", "1")
    joints = list(load_config(config).robot.joints)
    assert yaml.safe_load((ck / "contract.yaml").read_text())["planner"]["actions"][
        "joints"] == joints
    duet("export", "--module", "policy.reference:modules", "--checkpoint", str(ck), "--assets",
         str(ck), "--contract", str(ck / "contract.yaml"), "--precision", "fp32",
         "--calib", "4", "--parity-samples", "2", "--out", str(tmp_path / "bundle"))
    assert load_bundle(tmp_path / "bundle", expect_joints=joints).contract.action_joints == joints
    duet("eval", "--config", str(config), "--bundle", str(tmp_path / "bundle"), "--episodes", "1",
         "--ablation-episodes", "0", "--out", str(tmp_path / "eval"))
    report = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert report["runs"][0]["summary"]["episodes"] == 1
    assert "success" in (tmp_path / "eval" / "eval.md").read_text()
