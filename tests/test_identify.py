"""Identification and followers for your own robot: the excitation stays where it is allowed,
the fit recovers a servo it was given, the model-free follower inverts the fitted model, and
on the sim robot `duet identify` -> `duet train-follower --smoke` -> `duet follower-table
--smoke` run as a technician types them and write bundles the robot loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from sim_arm import JOINTS, N_JOINTS

from runtime.follower.gravity import GravityChain
from runtime.follower.identification import EPS, JointFit, ServoModel, Track, fit, gravity_features
from runtime.planner.excitation import GRID_HZ, Box, Excitation

ROOT = Path(__file__).resolve().parents[1]
TICK = 0.002


def _box(center: np.ndarray, span: float = 0.4, speed: float = 0.5) -> Box:
    return Box.around(center, span, [-2.0] * 3, [2.0] * 3, [2.0] * 3, speed)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_excitation_stays_in_its_box_under_its_speed_and_ends_at_rest_where_it_began(
        seed: int) -> None:
    start = np.array([0.3, -1.7, 1.0])  # joint 1 near its limit: the box is clipped there
    box = _box(start)
    exc = Excitation(start, box, sweep_s=10.0, poses=4, seed=seed)
    t = np.arange(0.0, exc.duration, 1.0 / GRID_HZ)
    q = exc.sample(t)
    assert (q >= box.lo - 1e-9).all() and (q <= box.hi + 1e-9).all()
    v = np.abs(np.diff(q, axis=0)) * GRID_HZ
    assert (v.max(axis=0) <= box.velocity * 1.01).all()
    np.testing.assert_allclose(q[0], exc.start, atol=1e-9)
    np.testing.assert_allclose(exc.sample(np.array([exc.duration]))[0], exc.start, atol=1e-9)
    assert np.abs(v[-20:]).max() < 1e-6  # at rest at the end (a hold)
    assert (np.ptp(q, axis=0) > 0.2).all()  # every joint is excited


def _synthetic(model: ServoModel, seconds: float, seed: int, center: np.ndarray | None = None,
               span: float = 0.8, play: float = 0.0) -> Track:
    """The servo the model describes, driven through an excitation: u is what it needed.
    `play`: a gear play of this width (rad) the servo sees the joint through (sim/world.py):
    u - q then also holds where in the play the joint sits, which depends on its history."""
    n = len(model.fits)
    center = np.zeros(n) if center is None else center
    box = Box.around(center, span, [-3.0] * n, [3.0] * n, [2.0] * n, 0.6)
    exc = Excitation(center, box, seconds, 6, seed=seed)
    t = np.arange(0.0, exc.duration, TICK)
    q = exc.sample(t)
    dq = np.gradient(q, TICK, axis=0)
    ddq = np.gradient(dq, TICK, axis=0)
    g = model.gravity_features(q)
    seen = q.copy()
    for i in range(1, len(q)):  # the play operator: the servo's view drags behind the joint
        seen[i] = np.clip(seen[i - 1], q[i] - play / 2, q[i] + play / 2)
    u = np.empty_like(q)
    for j, f in enumerate(model.fits):
        d = round(f.delay_s / TICK)
        need = seen[:, j] + f.a * ddq[:, j] + f.b * dq[:, j] + f.c * np.tanh(dq[:, j] / EPS) \
            + g[j] @ np.asarray(f.gravity)
        u[:, j] = np.concatenate([need[d:], np.repeat(need[-1:], d)])  # u(t) acts at t + d
    return Track(q, dq, ddq, u)


def _model(n: int = 3, chain: GravityChain | None = None) -> ServoModel:
    """A servo per joint; with `chain`, gravity over a gain of 40 N·m/rad (an STS3215's)."""
    rng = np.random.default_rng(5)
    width = gravity_features(np.zeros((1, n))).shape[1]
    free = [np.asarray(rng.normal(0, 0.01, width)).tolist() for _ in range(n)]
    fits = [JointFit(delay_s=TICK * (2 + 3 * j), a=2e-4 * (j + 1), b=0.05 + 0.01 * j,
                     c=0.002, r2=1.0, rms_rad=0.0,
                     gravity=[0.001 * j, 1 / 40] if chain else free[j])
            for j in range(n)]
    joints = chain.joints if chain else [f"j{j}" for j in range(n)]
    return ServoModel(joints, TICK, fits, 0, [], chain)


def test_the_fit_recovers_a_known_servo_from_its_motion() -> None:
    truth = _model()
    tracks = [_synthetic(truth, 12.0, seed) for seed in range(2)]
    got = fit(tracks, truth.joints, TICK, ["synthetic"])
    for want, f in zip(truth.fits, got.fits, strict=True):
        assert f.delay_s == pytest.approx(want.delay_s, abs=TICK)
        assert f.b == pytest.approx(want.b, rel=0.1)
        assert f.r2 > 0.99
        assert f.rms_rad < 2e-4


def _so101() -> tuple[GravityChain, np.ndarray]:
    from runtime.config import load_config
    from sim.robot import describe

    robot = describe(load_config(ROOT / "configs" / "so101_sim.yaml"))
    return robot.gravity_chain(), robot.home


@pytest.mark.parametrize("config", ["sim.yaml", "so101_sim.yaml", "arm7_can_sim.yaml"])
def test_the_description_gravity_is_mujocos_at_every_pose(config: str) -> None:
    """The chain's holding torques (numpy, and torch as the follower's graph runs them) equal
    MuJoCo's own at rest, over the whole joint range of every shipped robot (a coupled jaw
    included on duet's arm)."""
    import mujoco
    import torch

    from runtime.config import load_config
    from sim.robot import describe

    robot = describe(load_config(ROOT / "configs" / config))
    chain = robot.gravity_chain()
    model = robot.model()
    data = mujoco.MjData(model)
    poses = np.random.default_rng(0).uniform(robot.q_min, robot.q_max, size=(64, robot.n))
    want = []
    for q in poses:
        data.qpos[:] = model.qpos0
        data.qpos[robot.qadr] = q
        for c in robot.couplings:
            data.qpos[c.qadr] = c.c0 + c.c1 * q[c.source]
        mujoco.mj_forward(model, data)
        want.append(data.qfrc_bias[robot.dofadr].copy())
    assert np.abs(want).max() > 0.05  # the poses load the arm
    np.testing.assert_allclose(chain.torques(poses), want, atol=1e-9)
    again = GravityChain(**json.loads(json.dumps(asdict(chain))))  # as servo_model.json has it
    got = again.torques(torch.as_tensor(poses, dtype=torch.float32), torch).numpy()
    np.testing.assert_allclose(got, want, atol=2e-5 * max(1.0, float(np.abs(want).max())))


def test_with_the_description_two_numbers_a_joint_give_the_sag_everywhere() -> None:
    """SO-101 servos of gain 40 N·m/rad, excited in a box of +-0.3 rad around home: with the
    description and the right nominal gain the fit is exact at poses far outside the box;
    with a nominal gain 25 % off (what a datasheet estimate can be), the recordings pull the
    loaded joints' gain from it toward the truth; the joint that carries no load (the base's
    vertical pan) never gets a sag."""
    chain, home = _so101()
    truth = _model(len(chain.joints), chain)
    tracks = [_synthetic(truth, 12.0, seed, home, span=0.3) for seed in range(2)]
    far = np.random.default_rng(1).uniform(home - 1.0, home + 1.0, size=(200, len(home)))
    rest = np.zeros_like(far)
    want = truth.feedforward(far, rest, rest)

    exact = fit(tracks, truth.joints, TICK, ["synthetic"], chain=chain, gain=[40.0] * 6)
    np.testing.assert_allclose(exact.feedforward(far, rest, rest), want, atol=5e-5)

    off = fit(tracks, truth.joints, TICK, ["synthetic"], chain=chain, gain=[50.0] * 6)
    loaded = np.abs(chain.torques(far)).std(0) > 0.05
    assert loaded.sum() >= 2  # shoulder and elbow
    for f in np.array(off.fits)[loaded]:
        assert 0.8 + 0.01 < f.gravity[1] * 40 < 1.0, off.table()
    pan = chain.joints.index("shoulder_pan")
    assert np.abs(off.feedforward(far, rest, rest)[:, pan] - want[:, pan]).max() < 1e-4


@pytest.mark.parametrize("described", [False, True])
def test_the_model_free_follower_commands_what_the_fitted_servo_needs(described: bool) -> None:
    """On a quadratic reference the window determines r, r', r'' exactly: the graph's residual
    must equal the model's feed-forward at t + d, minus the reference one tick on (free trig
    gravity on 3 joints, or the SO-101's description on its 6)."""
    import torch

    from policy.tracking_followers import ModelFreeFollower

    chain, home = _so101() if described else (None, np.zeros(3))
    n = len(home)
    model = _model(n, chain)
    follower = ModelFreeFollower(model, lookahead=8, lookahead_dt=0.02)
    rng = np.random.default_rng(3)
    c0, c1, c2 = home + rng.uniform(-0.5, 0.5, n), rng.uniform(-0.5, 0.5, n), rng.uniform(-2, 2, n)
    taus = (np.arange(8) + 1.0) * 0.02
    window = c0 + c1 * taus[:, None] + c2 * taus[:, None] ** 2
    got = follower(torch.tensor(window[None], dtype=torch.float32), torch.zeros(1, n),
                   torch.zeros(1, n)).numpy()[0]
    d = np.array([f.delay_s for f in model.fits])
    r, v, a = c0 + c1 * d + c2 * d * d, c1 + 2 * c2 * d, 2 * c2

    def ff(j: int) -> float:
        one = model.feedforward(r[None], v[None], a[None])[0]
        return float(one[j])
    want = r + np.array([ff(j) for j in range(n)]) - (c0 + c1 * TICK + c2 * TICK**2)
    np.testing.assert_allclose(got, want, atol=2e-5)


def _duet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)



def test_the_follower_table_refuses_a_planner_for_another_robot_before_it_runs(
        tmp_path: Path) -> None:
    """A planner bundle made for duet's arm, on the SO-101's config: refused at once with the
    joints named (it was a traceback after the references and holds had run)."""
    from onnx_bundle import make_bundle

    bundle = make_bundle(tmp_path / "arm")
    out = _duet("follower-table", "--followers", str(tmp_path), "--config",
                "configs/so101_sim.yaml", "--planner", f"arm={bundle}", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "--planner arm:" in out.stderr and "base_yaw" in out.stderr
    assert "Traceback" not in out.stderr

@pytest.mark.system
@pytest.mark.slow
@pytest.mark.parametrize("config", ["arm7_can_sim.yaml", "so101_sim.yaml"])
def test_the_follower_table_tracks_and_holds_on_the_configured_robot(config: str) -> None:
    """The table's references and holds run on the config's robot (7 joints on arm7, the
    SO-101's own body), not duet's arm: a held-out reference is tracked, a pose is held."""
    from sim_arm import REPO

    from policy.follower_eval import excitation_refs, hold, hold_poses, track_references
    from policy.rollout import LoopSettings
    from runtime.config import load_config

    cfg = load_config(REPO / "configs" / config)
    settings = LoopSettings.from_config(cfg)
    refs = excitation_refs(cfg, 1, 0, 1.5)
    assert len(refs[0].start) == len(cfg.robot.joints)
    tracked = track_references(cfg, settings, None, refs, 10, 0.1)
    held = hold(cfg, settings, None, hold_poses(cfg, 1, 0), 10, 0.1)
    assert 0.0 < tracked.rms_rad < 0.1 and held.steady_rad is not None
    assert held.steady_rad < 0.05, held


@pytest.mark.system
@pytest.mark.slow
def test_the_follower_tables_planner_rows_run_on_the_configured_robot(tmp_path: Path) -> None:
    """A planner bundle for arm7's seven joints through the table's planner row: the episode
    starts from arm7's own start poses in its workspace (it began from duet's arm's six-joint
    poses: 'joint state must be 7 finite values')."""
    from onnx_bundle import make_bundle
    from sim_arm import REPO

    from policy.follower_eval import planner_chunks
    from policy.rollout import LoopSettings
    from runtime.config import load_config

    cfg = load_config(REPO / "configs" / "arm7_can_sim.yaml")
    joints = list(cfg.robot.joints)
    bundle = make_bundle(tmp_path / "arm7", offsets=np.zeros((10, len(joints))), joints=joints)
    settings = LoopSettings.from_config(cfg, timeout_s=1.0)
    result = planner_chunks(settings, cfg, None, bundle, 1)
    assert result.success == 0.0 and 0.0 <= result.rms_rad < 0.1, result


@pytest.mark.timeout(900)  # three commands, each starting torch or a stack
def test_identify_then_train_follower_then_the_table_on_the_sim(tmp_path: Path) -> None:
    from runtime.model.bundle import load_bundle
    from runtime.model.residual import residual_model

    ident = tmp_path / "identify"
    out = _duet("identify", "--config", "configs/sim.yaml", "--run-dir", str(tmp_path / "run"),
                "--out", str(ident), "--slow-only", "--sweep-s", "8", "--poses", "2",
                "--set", "follower.deadline_storm.misses=400", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    report = json.loads(out.stdout)
    assert [Path(p).name for p in report["recordings"]] == ["identify-slow.mcap"]
    assert {r["joint"] for r in report["table"]} == set(JOINTS)
    assert all(r["r2"] > 0.5 for r in report["table"]), report["table"]
    assert (ident / "servo_model.json").is_file()

    followers = tmp_path / "followers"
    out = _duet("train-follower", "--recordings", str(ident / "episodes"), "--bundle",
                "bundles/reference", "--out", str(followers), "--smoke", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    trained = json.loads(out.stdout)
    off = trained["offline_rms_mrad"]
    assert off["model-free"] < off["none"]  # the identified model explains the servo
    lock = trained["lockstep_rms_mrad"]
    assert trained["ship"] == min(lock, key=lock.get)  # the one that tracked best
    for kind in ("none", "model-free", "learned"):
        bundle = load_bundle(followers / f"bundle-{kind}")
        model = residual_model(bundle, list(JOINTS))
        assert (model is None) == (kind == "none")
        if model is not None:
            res = model.residual(np.zeros((8, N_JOINTS)), np.zeros(N_JOINTS), np.zeros(N_JOINTS))
            assert res.shape == (N_JOINTS,) and np.isfinite(res).all()

    out = _duet("follower-table", "--followers", str(followers), "--planner",
                "reference=bundles/reference", "--smoke", "--json")
    assert out.returncode in (0, 1), out.stderr[-3000:]
    table = json.loads(out.stdout)
    assert set(table["rows"]) == {"excitation (held out)", "hold", "planner: reference"}
    assert all(set(cells) == {"none", "model-free", "learned"} for cells in table["rows"].values())
    assert table["checks"]


@pytest.mark.system
def test_an_estop_during_identification_ends_it_and_keeps_the_recording(tmp_path: Path
                                                                         ) -> None:
    import time

    from runtime.ipc import endpoints
    from runtime.ipc.rpc import request_at

    run = tmp_path / "run"
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "identify", "--config", "configs/sim.yaml",
         "--run-dir", str(run), "--out", str(tmp_path / "identify"), "--yes",
         "--set", "follower.deadline_storm.misses=400"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        recording = tmp_path / "identify" / "episodes" / "identify-slow.mcap"
        deadline = time.monotonic() + 240
        while not recording.exists():  # the slow phase has begun
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline, "identification never started recording"
            time.sleep(0.2)
        reply = request_at(endpoints.control(str(run)), "estop", {"reason": "test"}, 10.0)
        assert reply["ok"], reply
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "ESTOP during the slow phase" in err
    assert recording.stat().st_size > 0  # kept
