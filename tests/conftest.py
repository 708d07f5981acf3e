"""Fixtures more than one test module needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import sim_arm

from runtime.config import DuetConfig

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def sim_config() -> DuetConfig:
    """`configs/sim.yaml`, validated: the sim arm's joints, limits, bus and rates as the runtime
    sees them. A fresh copy per test (loaded once per run), so a test may change it."""
    return sim_arm.sim_config()


@pytest.fixture
def sim_joints() -> list[str]:
    """The sim arm's joint names, in order, from `configs/sim.yaml`."""
    return list(sim_arm.JOINTS)


@pytest.fixture(scope="session")
def smoke_training(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`duet train --smoke` once per run: a folder with `ck/` (both checkpoints) and `data/`
    (the cached sim data, which a fine-tune run reuses)."""
    work = tmp_path_factory.mktemp("train")
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "train", "--smoke", "--out", str(work / "ck"),
         "--data-dir", str(work / "data"), "--threads", "1",
         "--config", str(ROOT / "configs/sim.yaml")],
        cwd=work, env=dict(os.environ, MUJOCO_GL="egl", PYTHONPATH=str(ROOT)),
        capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return work


@pytest.fixture(scope="session", autouse=True)
def _verified_stamps(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Bundle verified-stamps (runtime/model/verified.py) in this run's own folder, not the
    host's /run, for this process and every stack it starts."""
    os.environ["DUET_VERIFIED_DIR"] = str(tmp_path_factory.mktemp("verified"))
