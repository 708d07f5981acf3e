"""Bring your own policy (issue 10): planners defined in tests/byo_policies.py run through the
runtime's pipeline, the live stack (`duet run` processes) and the closed-loop eval with no
model-specific code in the runtime; what the robot cannot give a bundle is refused, naming
the input and the reason."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from byo_policies import (
    ACT_MEAN,
    ACT_STD,
    DRIVEN,
    GOALS,
    JOINTS,
    flow_bundle,
    two_camera_bundle,
)
from stack import REPO, Stack

from runtime.config import load_config
from runtime.deploy.preflight import problems
from runtime.model.bundle import load_bundle
from runtime.model.tokenizer import TokenizerError
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PipelineError, PlannerPipeline
from sim.robot import default_robot

HOME_Q = default_robot().home

TWO_CAMERAS = ["planner.cameras.wrist={kind: sim, width: 48, height: 48}",
               "planner.task_source=operator"]


@pytest.fixture(scope="module")
def two_cam(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return two_camera_bundle(tmp_path_factory.mktemp("byo") / "two-camera")


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return flow_bundle(tmp_path_factory.mktemp("byo") / "flow")


def _history(q: np.ndarray, t_ns: int = 10**9) -> StateHistory:
    h = StateHistory(6)
    for k in range(10):  # a still arm, 20 ms apart, up to t_ns
        h.add(t_ns - (9 - k) * 20_000_000, q=q, dq=np.zeros(6))
    return h


def _frames(scene: tuple[int, int] = (96, 96), wrist: tuple[int, int] = (48, 48)
            ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"scene": rng.integers(0, 256, (*scene, 3), dtype=np.uint8),
            "wrist": rng.integers(0, 256, (*wrist, 3), dtype=np.uint8)}


# ---------------------------------------------------------------------- the pipeline
def test_two_camera_planner_denormalises_deltas_and_holds_undriven_joints(two_cam: Path
                                                                          ) -> None:
    bundle = load_bundle(two_cam, expect_joints=JOINTS)
    pipe = PlannerPipeline(bundle, JOINTS)
    assert pipe.camera_names() == ["scene", "wrist"]
    pipe.set_instruction("go left")
    q = HOME_Q + 0.05
    hist = _history(q)
    hist.add(2 * 10**9, q=q, dq=np.zeros(6), q_cmd=np.r_[q[:5], 0.37])
    w = pipe.plan(Observation(_frames(), hist, 2 * 10**9))
    # the model's deltas (goal - q), de-normalised, plus the observed q: the goal
    np.testing.assert_allclose(w[:, :5], np.tile(GOALS["left"], (10, 1)), atol=1e-5)
    np.testing.assert_allclose(w[:, 5], 0.37)  # not driven: holds what the follower commands
    pipe.set_instruction("go right")
    w = pipe.plan(Observation(_frames(), hist, 2 * 10**9))
    np.testing.assert_allclose(w[-1, :5], GOALS["right"], atol=1e-5)
    assert set(pipe.stage_ms()) == {"policy", "total", "engines"}
    assert np.all(ACT_STD > 0) and ACT_MEAN.shape == (len(DRIVEN),)


def test_hf_tokenizer_refuses_unknown_words_naming_them(two_cam: Path) -> None:
    pipe = PlannerPipeline(load_bundle(two_cam), JOINTS)
    pipe.check_instruction("go left")
    with pytest.raises(TokenizerError, match=r"'jump'"):
        pipe.check_instruction("jump left")


@pytest.mark.parametrize("k", [1, 3, 10, 32])
def test_flow_head_reaches_the_known_chunk_in_k_euler_steps(flow: Path, k: int) -> None:
    """A rectified flow toward a known chunk: the runtime's integration lands on it from
    any noise, to float precision, whatever K (the manifest's 10 overridden here)."""
    pipe = PlannerPipeline(load_bundle(flow), JOINTS, flow_steps=k, seed=k)
    assert pipe.flow_steps == {"decoder": k}
    q = HOME_Q + 0.02
    w = pipe.plan(Observation(_frames(), _history(q), 10**9))
    goal = np.r_[GOALS["left"], 0.1]
    want = goal + (q - goal) * np.exp(-np.arange(10.0) - 3.0)[:, None]
    np.testing.assert_allclose(w, want, atol=2e-5)
    assert set(pipe.stage_ms()) == {"encoder", "decoder", "total", "engines"}


# ---------------------------------------------------------------------- refusals
def _cfg(bundle: Path, *sets: str):  # type: ignore[no-untyped-def]
    return load_config(REPO / "configs/sim.yaml", None, [f"bundle.path={bundle}", *sets])


def test_a_camera_the_config_does_not_define_is_refused(two_cam: Path) -> None:
    found = problems(_cfg(two_cam))
    assert any("input wrist: reads camera 'wrist', which the config does not define" in p
               for p in found), found
    assert problems(_cfg(two_cam, *TWO_CAMERAS)) == []


def test_a_camera_of_the_wrong_size_with_resize_none_is_refused(two_cam: Path) -> None:
    found = problems(_cfg(two_cam, "planner.cameras.wrist={kind: sim, width: 64, height: 64}"))
    assert any("input wrist: takes 48x48 with resize: none" in p for p in found), found


def test_a_joint_the_robot_lacks_is_refused(flow: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(flow, tmp_path / "b"))
    data = json.loads((bundle / "manifest.json").read_text())
    data["contract"]["planner"]["actions"]["joints"][5] = "tail"
    data["contract"]["planner"]["stages"][0]["inputs"][1]["joints"][5] = "tail"
    (bundle / "manifest.json").write_text(json.dumps(data))
    found = problems(_cfg(bundle))
    assert any("joints the robot lacks: tail (" in p for p in found), found


def test_a_missing_tokenizer_file_is_refused(two_cam: Path, tmp_path: Path) -> None:
    bundle = Path(shutil.copytree(two_cam, tmp_path / "b"))
    (bundle / "tokenizer.json").unlink()
    found = problems(_cfg(bundle, *TWO_CAMERAS))
    assert any("tokenizer.json: missing" in p for p in found), found


def test_a_broken_tokenizer_is_refused_at_start(two_cam: Path, tmp_path: Path) -> None:
    from runtime.model.bundle import sha256_file

    bundle = Path(shutil.copytree(two_cam, tmp_path / "b"))
    (bundle / "tokenizer.json").write_text("{}")
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"]["tokenizer.json"] = sha256_file(bundle / "tokenizer.json")
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(PipelineError, match=r"input tokens: .*tokenizer.json"):
        PlannerPipeline(load_bundle(bundle), JOINTS)


@pytest.mark.system
def test_an_engine_that_disagrees_with_the_contract_refuses_start(two_cam: Path,
                                                                  tmp_path: Path) -> None:
    """The contract says the wrist camera is 48x48; the graph was made for 48x48. Claim 40:
    the planner process exits 2 naming the tensor, nothing starts half-way."""
    bundle = Path(shutil.copytree(two_cam, tmp_path / "b"))
    data = json.loads((bundle / "manifest.json").read_text())
    cam = data["contract"]["planner"]["stages"][0]["inputs"][1]
    cam["height"] = cam["width"] = 40
    (bundle / "manifest.json").write_text(json.dumps(data))
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "planner", "--config", str(REPO / "configs/sim.yaml"),
         "--set", f"bundle.path={bundle}", "--set", f"run_dir={tmp_path / 'run'}",
         "--set", "planner.cameras.wrist={kind: sim, width: 40, height: 40}",
         "--duration", "1"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert "input 'wrist': the contract gives float32[1, 3, 40, 40], the model has " \
           "float32[1, 3, 48, 48]" in out.stderr


@pytest.mark.system
def test_a_follower_rate_off_the_look_ahead_grid_is_refused(tmp_path: Path) -> None:
    """The reference follower reads its look-ahead every 20 ms; at 20 Hz (50 ms ticks) the
    window is not on the tick grid: `config validate` says so, and the follower exits 2
    with the same words (no traceback, the run dir's lock released)."""
    bundle = REPO / "bundles/reference"
    want = "a look-ahead point every 20 ms is not a whole number of ticks at follower.hz=20"
    found = problems(_cfg(bundle, "follower.hz=20"))
    assert any(want in p for p in found), found
    assert problems(_cfg(bundle, "follower.hz=250")) == []
    out = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "follower",
         "--config", str(REPO / "configs/sim.yaml"), "--set", "follower.hz=20",
         "--set", f"run_dir={tmp_path / 'run'}", "--duration", "1"],
        cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2, out.stderr
    assert want in out.stderr and "Traceback" not in out.stderr, out.stderr


# ---------------------------------------------------------------------- live and eval
def _near(stack: Stack, goal: np.ndarray, joints: slice, timeout_s: float) -> np.ndarray:
    """The commanded reference (q + tracking error) once it is at `goal`, or at the timeout.
    (The measured q sits a servo's gravity sag, ~25 mrad on the shoulder, off it.)"""
    from runtime.ipc.messages import unpack_array

    deadline = time.monotonic() + timeout_s
    while True:
        tel = stack.telemetry()
        ref = unpack_array(tel["q"], "q") + unpack_array(tel["tracking_error"], "e")
        if np.abs(ref[joints] - goal).max() < 0.01 or time.monotonic() > deadline:
            return ref
        time.sleep(0.2)


@pytest.mark.system
def test_two_camera_planner_drives_the_live_stack_by_instruction(two_cam: Path,
                                                                 tmp_path: Path) -> None:
    with Stack(tmp_path, two_cam, [*TWO_CAMERAS, "planner.instruction=go left"]) as stack:
        stack.wait_mode("TRACK", 20)
        gripper = stack.q()[5]
        ref = _near(stack, GOALS["left"], slice(0, 5), 8.0)
        np.testing.assert_allclose(ref[:5], GOALS["left"], atol=0.01)
        time.sleep(2.0)  # the arm follows its command
        np.testing.assert_allclose(stack.q()[:5], GOALS["left"], atol=0.05)
        assert abs(stack.q()[5] - gripper) < 0.01  # not driven by the bundle: held
        out = subprocess.run([sys.executable, "-m", "runtime.cli", "task", "go right",
                              "--run-dir", stack.run_dir], cwd=REPO, capture_output=True,
                             text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        ref = _near(stack, GOALS["right"], slice(0, 5), 8.0)
        np.testing.assert_allclose(ref[:5], GOALS["right"], atol=0.01)
        assert stack.telemetry()["safety"]["faults"] == 0


@pytest.mark.system
def test_flow_planner_drives_the_live_stack(flow: Path, tmp_path: Path) -> None:
    with Stack(tmp_path, flow, ["planner.task_source=operator",
                                "planner.instruction=touch the red block"]) as stack:
        stack.wait_mode("TRACK", 20)
        ref = _near(stack, GOALS["left"], slice(0, 5), 8.0)
        np.testing.assert_allclose(ref[:5], GOALS["left"], atol=0.01)


@pytest.mark.system
def test_the_closed_loop_eval_runs_any_bundle(flow: Path, two_cam: Path, tmp_path: Path) -> None:
    """`duet eval` on bundles it knows nothing about: the same pipeline, the robot's core."""
    config = tmp_path / "cfg.yaml"
    import yaml

    cfg = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    cfg["sim"]["episode_timeout_s"] = 1.0  # these planners do not solve the task: just run
    cfg["planner"]["cameras"]["wrist"] = {"kind": "sim", "width": 48, "height": 48}
    config.write_text(yaml.safe_dump(cfg))
    from policy.eval import run_eval

    for bundle in (flow, two_cam):
        out = tmp_path / bundle.name
        assert run_eval([bundle], 1, 1, config, 0, out / "r.json", out, None,
                        log=lambda _: None) == 0
        report = json.loads((out / "r.json").read_text())
        first = report["runs"][0]["summary"]
        assert first["episodes"] == 1 and first["stage_ms"]["total"]["p50"] > 0
        assert all(run["summary"]["episodes"] == 1 for run in report["runs"])
