"""`duet train --smoke` as a real process, then export and a short closed-loop `duet eval`
on real ONNX files through the runtime engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from policy.models import Follower, Planner, load_checkpoint
from policy.train import split_by_episode, train_follower

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def _duet(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.fixture
def smoke(smoke_training: Path) -> Path:
    return smoke_training


def test_smoke_training_writes_loadable_checkpoints(smoke: Path) -> None:
    ck = smoke / "ck"
    planner, pmeta = load_checkpoint(ck / "planner.pt")
    follower, fmeta = load_checkpoint(ck / "follower.pt")
    assert isinstance(planner, Planner) and isinstance(follower, Follower)
    assert pmeta["joint_names"] == ["base_yaw", "shoulder", "elbow", "wrist_pitch",
                                    "wrist_roll", "gripper"]
    assert pmeta["horizon"] == 10 and pmeta["dt_s"] == 0.1 and pmeta["seed"] == 0
    assert fmeta["lookahead"] == 8 and fmeta["lookahead_dt_s"] == 0.02
    assert len(pmeta["dataset_sha256"]) == 64
    assert "touch" in pmeta["tokenizer"]["words"]
    # normalisation came from the data, not the constructor defaults
    assert not torch.equal(planner.delta_std, torch.ones(10, 6))
    metrics = json.loads((ck / "train-metrics.json").read_text())
    assert metrics["planner"]["val_loss"] is not None
    calib = np.load(ck / "calib.npz")
    assert calib["planner/image"].dtype == np.uint8 and calib["follower/ref"].shape[1:] == (8, 6)
    # the dataset cache is reused on a second run
    assert len(list((smoke / "data").glob("planner-*.npz"))) == 1


def test_follower_learns_a_known_residual() -> None:
    """Regression sanity: a residual that is a smooth function of the inputs is learnt."""
    rng = np.random.default_rng(0)
    n = 3000
    ref = rng.normal(0, 0.05, (n, 8, 6)).astype(np.float32)
    q = rng.normal(0, 0.5, (n, 6)).astype(np.float32)
    dq = rng.normal(0, 1.0, (n, 6)).astype(np.float32)
    residual = np.clip(0.3 * (ref[:, 0] - 0.0) + 0.01 * dq, -0.05, 0.05).astype(np.float32)
    data = {"ref": ref + q[:, None], "q": q, "dq": dq, "residual": residual,
            "episode": np.arange(n) // 30}
    torch.set_num_threads(1)
    result = train_follower(data, steps=400, seed=0, log=lambda _: None)
    assert result.metrics["val_r2"] > 0.8, result.metrics


def test_split_by_episode_keeps_episodes_whole() -> None:
    episode = np.repeat(np.arange(20), 5)
    train, val = split_by_episode(episode, 0.2, seed=1)
    assert len(train) + len(val) == 100 and len(val) == 20
    assert not set(episode[train]) & set(episode[val])


def test_export_and_closed_loop_eval(smoke: Path) -> None:
    ck, bundle = smoke / "ck", smoke / "bundle"
    proc = _duet("export", "--module", "policy.reference:modules", "--checkpoint", str(ck),
                 "--contract", str(ROOT / "policy/reference_contract.yaml"), "--assets",
                 str(ck), "--out", str(bundle), "--precision", "fp32", cwd=smoke)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load((ROOT / "configs/sim.yaml").read_text())
    cfg["sim"]["episode_timeout_s"] = 0.6  # an untrained policy only has to run, not succeed
    config = smoke / "short.yaml"
    config.write_text(yaml.safe_dump(cfg))
    from policy.eval import run_eval

    out = smoke / "eval"
    assert run_eval([bundle], 2, 1, config, 0, smoke / "r.json", out, ck,
                    log=lambda _: None) == 0
    report = json.loads((smoke / "r.json").read_text())
    names = [r["name"] for r in report["runs"]]
    assert names == ["full fp32", "residual off", "strategy broker", "strategy average",
                     "strategy switch"]
    assert report["runs"][0]["summary"]["episodes"] == 2
    assert {r["engine"] for r in report["latency"]} == {"onnxruntime", "pytorch eager"}
    assert (out / "eval.png").stat().st_size > 1000
    assert "| full fp32 | fp32 | on | blend |" in (out / "eval.md").read_text()
