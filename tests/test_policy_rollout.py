"""policy.rollout + policy.servo_target + policy.data: the lockstep loop with the scripted
expert as planner and servo inverse dynamics as follower, on the real sim."""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from policy.data import generate
from policy.rollout import LoopSettings, run_episode
from policy.servo_target import ServoResidualTarget
from runtime.config import load_config
from runtime.planner.observation import StateHistory
from sim.expert import expert_chunk
from sim.robot import default_robot
from sim.task import Episode, TaskTracker
from sim.world import SimWorld

HOME_Q = default_robot().home

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sim.yaml"


@pytest.fixture(scope="module")
def settings() -> LoopSettings:
    return LoopSettings.from_config(load_config(CONFIG))


def _two_step_seed() -> int:
    return next(s for s in range(100) if len(Episode(s, 0.5).order) == 2)


def test_expert_in_lockstep_touches_both_targets(settings: LoopSettings) -> None:
    world = SimWorld(seed=0)
    episode = Episode(_two_step_seed(), 0.5)
    latencies = []

    def plan(w: SimWorld, history: StateHistory, task: TaskTracker
             ) -> tuple[np.ndarray, float]:
        assert w is world
        q = history.latest("q").copy()
        latencies.append(0.05)
        return expert_chunk(world, task.remaining(), q), 0.05

    result = run_episode(world, episode, plan, None, settings, start_q=HOME_Q)
    assert result.success, result
    assert result.touched == 2 and result.n_targets == 2
    assert 0.5 < result.duration_s < settings.timeout_s
    assert result.planner_calls == len(latencies) > 2
    # chunk boundaries were measured and the default blend keeps them smooth
    assert len(result.boundary_vel_step) >= result.planner_calls - 3
    assert max(result.boundary_vel_step) < 0.5
    # the robot's core ran it: no faults, no plan refused
    assert result.faults == [] and result.plans_rejected == {}


def test_lockstep_eval_holds_when_plans_are_older_than_the_timeout(
        settings: LoopSettings) -> None:
    """The eval's numbers are the robot's: a planner slower than the plan timeout never
    moves the arm (every plan is refused as stale; the core holds)."""
    world = SimWorld(seed=0)
    episode = Episode(_two_step_seed(), 0.5)

    def slow(w: SimWorld, history: StateHistory, task: TaskTracker
             ) -> tuple[np.ndarray, float]:
        q = history.latest("q").copy()
        return expert_chunk(world, task.remaining(), q), settings.core.plan_timeout_s + 0.05

    short = replace(settings, timeout_s=2.0)
    result = run_episode(world, episode, slow, None, short, start_q=HOME_Q)
    assert not result.success and result.touched == 0
    assert result.plans_rejected.get("stale", 0) >= result.planner_calls - 3


def test_inverse_dynamics_residual_cuts_servo_lag() -> None:
    """Tracking a sinusoid: the residual target must beat the plain position command."""
    errors = {}
    for use in (False, True):
        world = SimWorld(seed=0)
        world.actuators.torque_enabled[:] = True
        target = ServoResidualTarget(world.model, world.position_kp, world.position_kd, 0.05)
        amp = np.array([0.5, 0.3, 0.3, 0.3, 0.5, 0.0])
        w = 2 * np.pi * 0.5
        err = []
        for k in range(1500):
            t = k * 1e-3
            if k % 2 == 0:
                r = HOME_Q + amp * np.sin(w * (t + 2e-3))
                v, a = amp * w * np.cos(w * (t + 2e-3)), -amp * w * w * np.sin(w * (t + 2e-3))
                res = target(r, v, a, world.q(), world.dq()) if use else 0.0
                world.actuators.goal_q[:] = r + res
            world.step(1)
            if k > 300:
                err.append(np.abs(world.q() - (HOME_Q + amp * np.sin(w * (t + 1e-3))))[:5])
        errors[use] = float(np.mean(err))
    assert errors[True] < 0.3 * errors[False], errors


def test_residual_target_from_window_matches_exact_derivatives() -> None:
    world = SimWorld(seed=0)
    target = ServoResidualTarget(world.model, world.position_kp, world.position_kd, 0.05)
    c0, c1, c2 = HOME_Q, np.full(6, 0.4), np.full(6, -1.0)
    tau = (np.arange(8) + 1.0) * 0.02 - 0.002
    window = c0 + tau[:, None] * c1 + tau[:, None] ** 2 * c2
    q, dq = HOME_Q + 0.01, np.full(6, 0.3)
    assert np.allclose(target.from_window(window, q, dq, 0.002), target(c0, c1, 2 * c2, q, dq))


def test_generate_dataset_shapes(settings: LoopSettings) -> None:
    pdata, fdata, stats = generate(2, seed=5, settings=settings, log=lambda _: None)
    n = len(pdata["q"])
    assert n > 3 and stats["planner_samples"] == n
    assert pdata["image"].shape == (n, 96, 96, 3) and pdata["image"].dtype == np.uint8
    assert pdata["tokens"].shape == (n, 16) and pdata["tokens"].dtype == np.int64
    assert pdata["chunk"].shape == (n, 10, 6)
    assert set(np.unique(pdata["episode"]).tolist()) == {0, 1}
    # perception labels: 4 blocks on the table, the target order, the next target
    assert pdata["blocks_xy"].shape == (n, 4, 2) and pdata["visible"].shape == (n, 4)
    assert ((pdata["order"] >= -1) & (pdata["order"] < 4)).all()
    nearest = np.linalg.norm(pdata["blocks_xy"] - pdata["target_xy"][:, None], axis=-1).min(1)
    assert nearest.max() < 1e-6  # the next target is one of the blocks
    m = len(fdata["q"])
    assert fdata["ref"].shape == (m, 8, 6) and fdata["residual"].shape == (m, 6)
    assert np.abs(fdata["residual"]).max() <= settings.core.residual_max + 1e-6
    assert np.abs(fdata["residual"]).max() > 1e-3  # a real, non-zero target
    assert len(fdata["episode"]) == m
    # labels are the expert's chunk at the recorded state: its first waypoint is near q
    assert np.abs(pdata["chunk"][:, 0] - pdata["q"]).max() < 0.5


def test_eval_and_robot_build_the_same_core_settings(tmp_path: Path, monkeypatch) -> None:
    """One config -> core mapping: the lockstep eval's core and the follower process's core
    are built from the same config alike, margins and fault action included."""
    import policy.rollout
    import runtime.follower.process
    from runtime.follower.core import CoreSettings

    cfg = load_config(CONFIG, overrides=[
        "robot.limits.state_margin=0.07", "robot.limits.plan_margin=0.45",
        "follower.fault_action=torque_off", "follower.blend_ms=40", "follower.residual=false",
        f"run_dir={tmp_path}"])
    built: dict[str, CoreSettings] = {}

    class Built(Exception):
        pass

    def capture(where: str):  # stands in for FollowerCore: records what it is given
        def core(s: CoreSettings, model: object = None) -> None:
            built[where] = s
            raise Built
        return core

    monkeypatch.setattr(policy.rollout, "FollowerCore", capture("eval"))
    monkeypatch.setattr(runtime.follower.process, "FollowerCore", capture("robot"))
    with pytest.raises(Built):
        run_episode(SimWorld(seed=0), Episode(0, 0.5), lambda *a: (None, 0.0), None,
                    LoopSettings.from_config(cfg))
    with pytest.raises(Built):
        runtime.follower.process.Follower(cfg, bus=object())  # type: ignore[arg-type]
    eval_s, robot_s = built["eval"], built["robot"]
    assert eval_s.differences(robot_s) == []
    assert (robot_s.state_margin, robot_s.plan_margin, robot_s.fault_action,
            robot_s.blend_s, robot_s.residual) == (0.07, 0.45, "torque_off", 0.04, False)
