"""`duet eval` with a success measure from the config (`sim.success`): a joint pose or an MJCF
site's position, for a company's own task and robot, instead of the sim's block task."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from onnx_bundle import H, make_bundle
from sim_arm import JOINTS
from stack import REPO

from runtime.config import ConfigError, SuccessMeasure, load_config
from runtime.model.bundle import MANIFEST, sha256_file
from sim.robot import default_robot
from sim.success import TargetJudge
from sim.task import RUNNING, SUCCESS, TIMEOUT, Episode
from sim.world import SimWorld

N = len(JOINTS)


def _hold_planner(target: np.ndarray) -> onnx.ModelProto:
    """waypoints = target at every step (0 * q keeps q an input): a planner that drives the
    arm to one pose and holds it."""
    graph = helper.make_graph(
        [helper.make_node("Unsqueeze", ["q", "axis1"], ["q3"]),
         helper.make_node("Mul", ["q3", "zero"], ["nothing"]),
         helper.make_node("Add", ["nothing", "target"], ["waypoints"])], "hold",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 96, 96, 3]),
         helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, 16]),
         helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, N])],
        [helper.make_tensor_value_info("waypoints", TensorProto.FLOAT, [1, H, N])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
         numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero"),
         numpy_helper.from_array(np.tile(target, (1, H, 1)).astype(np.float32), "target")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _target() -> np.ndarray:
    target = default_robot().home.copy()
    target[:2] += (0.15, -0.1)  # base and shoulder away from every start's home
    return target


@pytest.fixture(scope="module")
def holding(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A bundle whose planner holds `_target()` (the exported tiny bundle, its graph swapped)."""
    tmp = tmp_path_factory.mktemp("hold")
    src = make_bundle(tmp / "src")
    out = tmp / "hold"
    shutil.copytree(src, out)
    onnx.save(_hold_planner(_target()), out / "planner.onnx")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["files"]["planner.onnx"] = sha256_file(out / "planner.onnx")
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return out


def _config(tmp: Path, success: dict[str, object]) -> Path:
    cfg = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    cfg["sim"]["episode_timeout_s"] = 4.0
    cfg["sim"]["success"] = success
    path = tmp / f"cfg-{len(list(tmp.glob('cfg-*')))}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_measure_needs_its_target(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind pose needs `pose`"):
        load_config(_config(tmp_path, {"kind": "pose"}))
    with pytest.raises(ConfigError, match="kind site needs `site`"):
        load_config(_config(tmp_path, {"kind": "site", "site": "fingertip"}))
    world = SimWorld(seed=0)
    with pytest.raises(ValueError, match="names nope, not among the robot's joints"):
        TargetJudge(Episode(0), SuccessMeasure(kind="pose", pose={"nope": 0.0}), world,
                    JOINTS, 1.0)
    with pytest.raises(ValueError, match="no such site"):
        TargetJudge(Episode(0), SuccessMeasure(kind="site", site="nope", position=(0, 0, 0)),
                    world, JOINTS, 1.0)


def test_a_site_target_succeeds_after_the_hold_and_times_out_elsewhere() -> None:
    world = SimWorld(seed=0)
    robot = world.robot
    world.set_joint_state(_target())
    world.step(1)
    where = tuple(float(v) for v in world.fingertip())
    judge = TargetJudge(Episode(0), SuccessMeasure(kind="site", site=robot.end_effector,
                                                   position=where, hold_s=0.1),
                        world, JOINTS, timeout_s=1.0)
    judge.start(world, 0.0)
    assert judge.update(world, 0.0) == RUNNING  # inside, not yet held
    assert judge.update(world, 0.1) == SUCCESS and judge.duration_s == pytest.approx(0.1)
    far = TargetJudge(Episode(0), SuccessMeasure(kind="site", site=robot.end_effector,
                                                 position=(where[0] + 0.1, *where[1:])),
                      world, JOINTS, timeout_s=1.0)
    far.start(world, 0.0)
    assert far.update(world, 0.5) == RUNNING and far.update(world, 1.0) == TIMEOUT


@pytest.mark.slow
def test_duet_eval_counts_a_pose_target_from_the_config(holding: Path, tmp_path: Path) -> None:
    """The planner holds a pose: a pose measure at it succeeds every episode, one 0.3 rad
    away never does; the table says which measure it counted."""
    from policy.eval import run_eval

    target = _target()
    rates = {}
    for name, offset in (("reached", 0.0), ("elsewhere", 0.3)):
        pose = {JOINTS[0]: float(target[0] + offset), JOINTS[1]: float(target[1])}
        config = _config(tmp_path, {"kind": "pose", "pose": pose, "tolerance_rad": 0.05,
                                    "hold_s": 0.2, "instruction": "touch the red block"})
        out = tmp_path / name
        assert run_eval([holding], 1, 0, config, 0, out / "r.json", out, None,
                        log=lambda _: None) == 0
        report = json.loads((out / "r.json").read_text())
        assert report["success_measure"]["kind"] == "pose"
        assert "pose within 0.05 rad of" in (out / "eval.md").read_text()
        rates[name] = report["runs"][0]["summary"]["success_rate"]
    assert rates == {"reached": 1.0, "elsewhere": 0.0}
