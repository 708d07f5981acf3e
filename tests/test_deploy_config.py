"""`duet config validate | show | set | diff` on real files."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from runtime.cli import main
from runtime.config import load_config

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "duet.yaml").write_text((REPO / "configs/sim.yaml").read_text())
    (etc / "site.yaml").write_text(f"run_dir: {tmp_path / 'run'}\n")
    return etc


def _args(etc: Path) -> list[str]:
    return ["--config", str(etc / "duet.yaml"), "--site", str(etc / "site.yaml"),
            "--log", str(etc / "changes.log"), "--timeout", "0.5"]


def test_validate_show_diff(etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "validate", *_args(etc)]) == 0
    assert main(["config", "diff", *_args(etc)]) == 0
    out = capsys.readouterr().out
    assert f'run_dir: "/run/duet" -> "{etc.parent / "run"}"' in out
    assert main(["config", "show", "--effective", *_args(etc)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["follower"]["hold_decel"] == 4.0  # schema default, not in the file
    bad = etc / "bad.yaml"
    bad.write_text("robot: {name: x}\n")
    assert main(["config", "validate", str(bad), *_args(etc)]) == 1
    err = capsys.readouterr().err
    assert str(bad) in err and "robot.joints" in err


def test_set_structural_key_needs_restart_and_is_logged(
        etc: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SUDO_USER", "alice")
    assert main(["config", "set", "follower.hz=400", *_args(etc)]) == 0
    out = capsys.readouterr().out
    assert "follower.hz: 500.0 -> 400.0" in out
    assert "restart needed: systemctl restart duet-follower" in out
    assert load_config(etc / "duet.yaml", etc / "site.yaml").follower.hz == 400
    assert (etc / "site.yaml.bak").read_text() == f"run_dir: {etc.parent / 'run'}\n"
    assert (etc / "duet.yaml").read_text() == (REPO / "configs/sim.yaml").read_text()
    log = (etc / "changes.log").read_text()
    assert "user=alice key=follower.hz old=500.0 new=400.0 applied=restart" in log


def test_set_tunable_without_follower_saves_for_next_start(
        etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "set", "follower.blend_ms=60", *_args(etc)]) == 0
    assert "follower not running" in capsys.readouterr().out
    assert "applied=next-start" in (etc / "changes.log").read_text()


def test_invalid_set_changes_nothing(etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (etc / "site.yaml").read_text()
    assert main(["config", "set", "follower.hz=-5", *_args(etc)]) == 1
    assert "follower.hz" in capsys.readouterr().err
    assert main(["config", "set", "follower.no_such_key=1", *_args(etc)]) == 1
    assert "no such key" in capsys.readouterr().err
    assert (etc / "site.yaml").read_text() == before
    assert not (etc / "changes.log").exists()
    assert not list(etc.glob(".site.yaml.*")) and not list(etc.glob("tmp*"))


def test_set_applies_tunables_live_on_a_running_follower(
        etc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real follower on the sim: a tunable goes through the control socket, and the
    follower reports the new value back."""
    import os
    import subprocess
    import sys

    from onnx_bundle import make_bundle
    from stack import stop_processes

    from runtime import endpoints
    from runtime.rpc import request_at

    run_dir = tmp_path / "run"
    env = {**os.environ, "MUJOCO_GL": "egl"}
    sets = ["--set", f"run_dir={run_dir}", "--set", f"bundle.path={make_bundle(tmp_path / 'b')}"]
    cli = [sys.executable, "-m", "runtime.cli"]
    sim = subprocess.Popen([*cli, "sim", "--config", str(etc / "duet.yaml"), *sets], cwd=REPO,
                           env=env, stdout=subprocess.PIPE)
    follower = None
    try:
        assert sim.stdout is not None
        device = sim.stdout.readline().decode().strip()
        follower = subprocess.Popen([*cli, "follower", "--config", str(etc / "duet.yaml"), *sets,
                                     "--set", f"bus.device={device}"], cwd=REPO, env=env)
        deadline = time.monotonic() + 30
        while not (run_dir / "control").exists():
            assert time.monotonic() < deadline and follower.poll() is None
            time.sleep(0.1)
        args = [*_args(etc)[:-1], "5.0"]  # a generous live-apply timeout
        assert main(["config", "set", "follower.blend_ms=45", *args]) == 0
        assert "applied live" in capsys.readouterr().out
        got = request_at(endpoints.control(str(run_dir)), "get", {}, timeout_s=5.0)
        assert got["ok"] and got["result"]["config"]["follower"]["blend_ms"] == 45
        assert "key=follower.blend_ms old=80.0 new=45.0 applied=live" in \
            (etc / "changes.log").read_text()
    finally:
        stop_processes(follower, sim)
