"""`duet doctor` on this machine with real devices (a pty), real bundles and real configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml
from onnx_bundle import make_bundle

from runtime.cli import main
from runtime.deploy.doctor import FAIL, OK, diagnose

REPO = Path(__file__).resolve().parents[1]


def _config(tmp: Path, device: str, bundle: Path) -> Path:
    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"]["device"] = device
    data["bundle"]["path"] = str(bundle)
    data["run_dir"] = str(tmp / "run")
    data["recorder"] = {"dir": str(tmp / "rec"), "budget_mb": 1.0}
    path = tmp / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _levels(config: Path) -> dict[str, str]:
    return {c.name: c.level for c in diagnose(config, None)}


def test_healthy_device_and_bundle(tmp_path: Path) -> None:
    master, slave = os.openpty()  # a real serial-like character device
    try:
        levels = _levels(_config(tmp_path, os.ttyname(slave), make_bundle(tmp_path / "b")))
    finally:
        os.close(master)
        os.close(slave)
    assert levels["config"] == OK and levels["bus device"] == OK
    assert levels["bundle"] == OK and levels["engine"] == OK and levels["disk"] == OK
    assert FAIL not in levels.values()


def test_missing_device_and_tampered_bundle_fail(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    bundle = make_bundle(tmp_path / "b")
    (bundle / "planner.onnx").write_bytes(b"tampered")
    config = _config(tmp_path, "/dev/ttyDUET-missing", bundle)
    assert main(["doctor", "--config", str(config), "--site", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  bus device" in out and "does not exist" in out
    assert "FAIL  bundle" in out and "planner.onnx" in out
    assert "fix: duet bundle rollback" in out


def test_invalid_config_is_one_failing_check(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("robot: 3\n")
    checks = diagnose(bad, None)
    assert [(c.name, c.level) for c in checks] == [("config", FAIL)]
