"""`duet config validate | show | set | diff` on real files."""

from __future__ import annotations

import json
import pwd
import time
from pathlib import Path

import pytest
import yaml
from onnx_bundle import make_bundle

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
    return ["--config", str(etc / "duet.yaml"), "--site", str(etc / "site.yaml")]


def _set_args(etc: Path, timeout_s: float = 0.5) -> list[str]:
    return [*_args(etc), "--log", str(etc / "changes.log"), "--timeout", str(timeout_s),
            "--run-dir", str(etc.parent / "run")]


def test_validate_show_diff(etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # the shipped config names its bundle relative to itself: not there in this copy
    assert main(["config", "validate", *_args(etc)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL bundle.path: {etc.parent / 'bundles/reference'}" in out
    bundle = make_bundle(etc.parent / "bundles/reference")
    assert main(["config", "validate", *_args(etc)]) == 0
    assert main(["config", "diff", *_args(etc)]) == 0
    out = capsys.readouterr().out
    assert f'run_dir: "/run/duet" -> "{etc.parent / "run"}"' in out
    assert main(["config", "show", "--effective", *_args(etc)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["follower"]["hold_decel"] == 4.0  # schema default, not in the file
    assert shown["bundle"]["path"] == str(bundle)  # relative to the config file
    assert main(["config", "show", "--json", *_args(etc)]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"]["path"] == str(bundle)
    bad = etc / "bad.yaml"
    bad.write_text("robot: {name: x}\n")
    assert main(["config", "validate", str(bad), *_args(etc)]) == 2  # bad input
    err = capsys.readouterr().err
    assert str(bad) in err and "robot.joints" in err


def test_set_structural_key_needs_restart_and_is_logged(
        etc: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    # the log names the real caller (the kernel's uid, via sudo's SUDO_UID), not $USER
    monkeypatch.setenv("SUDO_USER", "alice")
    monkeypatch.setenv("USER", "mallory")
    monkeypatch.setenv("SUDO_UID", "65534")
    assert main(["config", "set", "follower.hz=400", *_set_args(etc)]) == 0
    out = capsys.readouterr().out
    assert "follower.hz: 500.0 -> 400.0" in out
    # not installed (a workstation's files): `duet run` is what restarts, never systemctl
    assert "restart needed: stop `duet run` (Ctrl-C, or duet stop) and start it again" in out
    assert load_config(etc / "duet.yaml", etc / "site.yaml").follower.hz == 400
    assert (etc / "site.yaml.bak").read_text() == f"run_dir: {etc.parent / 'run'}\n"
    assert (etc / "duet.yaml").read_text() == (REPO / "configs/sim.yaml").read_text()
    log = (etc / "changes.log").read_text()
    nobody = pwd.getpwuid(65534).pw_name
    assert f"user={nobody} key=follower.hz old=500.0 new=400.0 applied=restart" in log


def test_workstation_set_needs_a_site_file(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Without --site, a config not installed as duet.yaml has no site layer: nothing is
    created under /etc or /var/lib."""
    monkeypatch.delenv("DUET_CONFIG", raising=False)
    config = tmp_path / "robot.yaml"
    config.write_text((REPO / "configs/sim.yaml").read_text())
    assert main(["config", "set", "follower.blend_ms=60", "--config", str(config)]) == 2
    assert "no site file to edit: pass --site FILE" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["robot.yaml"]
    monkeypatch.setenv("DUET_CONFIG", str(config))  # the same through the environment
    site = tmp_path / "site.yaml"
    assert main(["config", "set", "follower.blend_ms=60", "--site", str(site),
                 "--run-dir", str(tmp_path / "run"), "--timeout", "0.2"]) == 0
    assert "blend_ms: 60" in site.read_text()
    assert "applied=next-start" in (tmp_path / "config-changes.log").read_text()


def test_did_you_mean_and_errors_name_the_users_file(
        etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "set", "follower.blendms=60", *_set_args(etc)]) == 2
    assert "did you mean follower.blend_ms?" in capsys.readouterr().err
    (etc / "site.yaml").write_text("follower:\n  blendms: 60\n")
    assert main(["config", "validate", *_args(etc)]) == 2
    err = capsys.readouterr().err
    assert f"{etc / 'site.yaml'}: follower.blendms: Extra inputs are not permitted " \
        "(did you mean follower.blend_ms?)" in err


@pytest.mark.system
def test_concurrent_sets_lose_nothing(etc: Path) -> None:
    """Eight `duet config set` processes at once: every update lands, each logged once, the
    backup is a complete file and no temp file is left."""
    import subprocess
    import sys

    values = {"follower.blend_ms": 61.0, "follower.hold_decel": 3.5,
              "follower.residual_max": 0.04, "follower.plan_timeout_ms": 450.0,
              "follower.residual_filter_ms": 40.0, "planner.hz": 4.0, "recorder.ring_s": 20.0,
              "recorder.budget_mb": 1000.0}
    procs = [subprocess.Popen([sys.executable, "-m", "runtime.cli", "config", "set",
                               f"{k}={v}", *_set_args(etc, 0.2)], cwd=REPO,
                              stdout=subprocess.DEVNULL) for k, v in values.items()]
    assert [p.wait(timeout=120) for p in procs] == [0] * len(procs)
    cfg = load_config(etc / "duet.yaml", etc / "site.yaml")
    for key, value in values.items():
        section, name = key.split(".")
        assert getattr(getattr(cfg, section), name) == value, key
    log = (etc / "changes.log").read_text().splitlines()
    assert sorted(line.split(" key=")[1].split(" ")[0] for line in log) == sorted(values)
    assert isinstance(yaml.safe_load((etc / "site.yaml.bak").read_text()), dict)
    assert sorted(p.name for p in etc.iterdir()) == ["changes.log", "duet.yaml", "site.yaml",
                                                     "site.yaml.bak"]


def test_set_rerenders_the_installed_dropins(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    from runtime.deploy.install import InstallPlan, install
    from runtime.deploy.layout import Layout

    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"]["device"] = "/dev/ttyDUET0"
    data.pop("sim")
    config = tmp_path / "robot.yaml"
    config.write_text(yaml.safe_dump(data))
    root = tmp_path / "root"
    install(InstallPlan(layout=Layout(root), prefix="/opt/duet", config=config, venv=False,
                        log=lambda _: None))
    units = root / "etc/systemd/system"
    assert "After=dev-ttyDUET0.device" in (units / "duet-follower.service.d/device.conf"
                                           ).read_text()
    etc_args = ["--config", str(root / "etc/duet/duet.yaml"), "--run-dir", str(tmp_path)]
    assert main(["config", "set", "bus.device=/dev/ttyUSB3", *etc_args]) == 0
    out = capsys.readouterr().out
    assert "re-rendered" in out and "device.conf" in out
    assert "After=dev-ttyUSB3.device" in (units / "duet-follower.service.d/device.conf"
                                          ).read_text()
    assert main(["config", "set", "follower.realtime.cpu=0", *etc_args]) == 0
    assert "CPUAffinity=0\n" in (units / "duet-follower.service.d/realtime.conf").read_text()
    assert "realtime.conf" in capsys.readouterr().out
    # the change log of the install, under its root
    assert "key=follower.realtime.cpu" in (root / "var/lib/duet/config-changes.log").read_text()


def test_set_tunable_without_follower_saves_for_next_start(
        etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["config", "set", "follower.blend_ms=60", *_set_args(etc)]) == 0
    assert "follower not running" in capsys.readouterr().out
    assert "applied=next-start" in (etc / "changes.log").read_text()


def test_invalid_set_changes_nothing(etc: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = (etc / "site.yaml").read_text()
    assert main(["config", "set", "follower.hz=-5", *_set_args(etc)]) == 2
    err = capsys.readouterr().err
    assert f"{etc / 'site.yaml'}: follower.hz" in err and "tmp" not in err.split(str(etc))[1]
    assert main(["config", "set", "follower.no_such_key=1", *_set_args(etc)]) == 2
    assert "no such key" in capsys.readouterr().err
    assert (etc / "site.yaml").read_text() == before
    assert not (etc / "changes.log").exists()
    assert not list(etc.glob(".site.yaml.*")) and not list(etc.glob("tmp*"))


@pytest.mark.system
def test_set_applies_tunables_live_on_a_running_follower(
        etc: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A real follower on the sim: a tunable goes through the control socket, and the
    follower reports the new value back."""
    import os
    import subprocess
    import sys

    from stack import stop_processes

    from runtime.ipc import endpoints
    from runtime.ipc.rpc import request_at

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
        args = _set_args(etc, 5.0)  # a generous live-apply timeout
        assert main(["config", "set", "follower.blend_ms=45", *args]) == 0
        assert "applied live" in capsys.readouterr().out
        got = request_at(endpoints.control(str(run_dir)), "get", {}, timeout_s=5.0)
        assert got["ok"] and got["result"]["config"]["follower"]["blend_ms"] == 45
        assert "key=follower.blend_ms old=80.0 new=45.0 applied=live" in \
            (etc / "changes.log").read_text()
    finally:
        stop_processes(follower, sim)


def test_set_keeps_the_site_files_comment_header(etc: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    site = etc / "site.yaml"
    site.write_text("# Site overrides layered on duet.yaml; `duet config set` edits this file.\n"
                    f"run_dir: {etc.parent / 'run'}\n")
    assert main(["config", "set", "follower.hz=400", *_set_args(etc)]) == 0
    text = site.read_text()
    assert text.startswith("# Site overrides layered on duet.yaml;"), text
    assert load_config(etc / "duet.yaml", site).follower.hz == 400


def test_bare_show_with_no_config_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """It printed nothing and exited 0."""
    monkeypatch.delenv("DUET_CONFIG", raising=False)
    missing = tmp_path / "etc/duet/duet.yaml"
    assert main(["config", "show", "--config", str(missing)]) == 2
    assert f"no config at {missing}" in capsys.readouterr().err


_KILL_AT_FSYNC = """
import os, signal, sys
real, calls, at = os.fsync, [0], int(sys.argv[1])
def fsync(fd):
    calls[0] += 1
    if calls[0] == at:
        os.kill(os.getpid(), signal.SIGKILL)  # killed in the middle of the write
    real(fd)
os.fsync = fsync
from runtime.cli import main
sys.exit(main(["config", "set", *sys.argv[2:]]))
"""


def test_a_set_killed_mid_write_leaves_temp_files_the_next_set_removes(etc: Path) -> None:
    """SIGKILL at each fsync of `config set`: whatever is left, the next `config set` removes
    it under the lock, and the site file is whole."""
    import subprocess
    import sys

    killed = 0
    for at in range(1, 5):  # the backup's, the file's, the folder's, the change log's fsync
        blend = 20 + at
        proc = subprocess.run([sys.executable, "-c", _KILL_AT_FSYNC, str(at),
                               f"follower.blend_ms={blend}", *_set_args(etc, 0.2)],
                              cwd=REPO, capture_output=True, text=True, timeout=60)
        killed += proc.returncode == -9
        assert main(["config", "set", f"follower.blend_ms={blend + 100}",
                     *_set_args(etc, 0.2)]) == 0
        left = sorted(p.name for p in etc.iterdir() if p.name.startswith("."))
        assert left == [], f"kill at fsync {at} left {left}"
        assert yaml.safe_load((etc / "site.yaml").read_text())["follower"]["blend_ms"] \
            == blend + 100
    assert killed == 4  # the kills really happened inside the writes
