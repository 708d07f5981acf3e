"""`duet doctor` on this machine with real devices (a pty), real bundles and real configs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from onnx_bundle import make_bundle

from runtime.cli import main
from runtime.deploy.doctor import diagnose
from runtime.deploy.host_checks import FAIL, OK

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
    return {c.name: c.level for c in diagnose(config, None, str(config.parent / "run"))}


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
    checks = diagnose(bad, None, str(tmp_path))
    assert [(c.name, c.level) for c in checks] == [("config", FAIL)]


def test_latched_fault_dead_camera_and_json(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    config = _config(tmp_path, "sim", make_bundle(tmp_path / "b"))
    data = yaml.safe_load(config.read_text())
    planner = data.setdefault("planner", {})
    camera = {"kind": "v4l2", "device": "/dev/video-missing"}
    if "cameras" in planner:  # named cameras
        planner["cameras"] = {"scene": camera}
    else:
        planner["camera"] = camera
    config.write_text(yaml.safe_dump(data))
    run = tmp_path / "run"
    run.mkdir()
    (run / "follower.latched").write_text("ESTOP: cli (alice)\n")
    assert main(["doctor", "--config", str(config), "--run-dir", str(run), "--json"]) == 1
    checks = json.loads(capsys.readouterr().out)["checks"]
    by_name = {c["name"]: c for c in checks}
    assert by_name["latched fault"]["level"] == FAIL
    assert "ESTOP: cli (alice)" in by_name["latched fault"]["detail"]
    assert "duet reset" in by_name["latched fault"]["fix"]
    assert by_name["camera"]["level"] == FAIL
    assert "/dev/video-missing does not exist" in by_name["camera"]["detail"]


@pytest.mark.system
def test_cpu_contention_names_the_busy_process(tmp_path: Path) -> None:
    from runtime.config import load_config
    from runtime.deploy.host_checks import WARN, check_cpu

    cfg = load_config(_config(tmp_path, "sim", tmp_path / "b"))
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        check = check_cpu(cfg, sample_s=1.0)
    finally:
        hog.kill()
        hog.wait()
    assert check.level == WARN and f"pid {hog.pid}" in check.detail, check
    assert "cpu 1 (the follower's)" in check.fix


def test_services_start_limit_hit_names_the_command_that_recovers(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """systemd as a real `systemctl` executable would answer for a unit past its start limit."""
    from runtime.config import load_config
    from runtime.deploy.doctor import check_services

    units = tmp_path / "etc/systemd/system"
    units.mkdir(parents=True)
    (units / "duet-follower.service").write_text("[Service]\n")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    failed = "ActiveState=failed\\nSubState=failed\\nResult=start-limit-hit\\nNRestarts=5"
    running = "ActiveState=active\\nSubState=running\\nResult=success\\nNRestarts=0"
    (bin_dir / "systemctl").write_text(f"""#!/bin/sh
case "$*" in
  *is-enabled*duet-recorder*) echo disabled; exit 1;;
  *is-enabled*) echo enabled;;
  *duet-follower*) printf 'LoadState=loaded\\n{failed}\\n';;
  *) printf 'LoadState=loaded\\n{running}\\n';;
esac
""")
    (bin_dir / "systemctl").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    checks = check_services(load_config(_config(tmp_path, "sim", tmp_path / "b")), tmp_path)
    follower, planner = checks[0], checks[1]
    assert follower.level == FAIL and "start limit hit" in follower.detail
    # the recorder is disabled: naming it would make reset-failed exit 1 and skip the restart
    assert "sudo systemctl reset-failed duet-follower.service duet-planner.service && " \
        in follower.fix
    assert "&& sudo systemctl restart duet.target" in follower.fix
    assert planner.level == OK and "active/running" in planner.detail


def test_installed_sim_config_fails(tmp_path: Path) -> None:
    """An installed config (…/etc/duet/duet.yaml) whose bus is the sim: the follower would
    crash-loop, so doctor says FAIL (not ok)."""
    etc = tmp_path / "etc/duet"
    etc.mkdir(parents=True)
    installed = etc / "duet.yaml"
    installed.write_text(_config(tmp_path, "sim", make_bundle(tmp_path / "b")).read_text())
    levels = {c.name: c for c in diagnose(installed, None, str(tmp_path / "run"))}
    assert levels["bus device"].level == FAIL and "crash-loop" in levels["bus device"].detail


def _diagnose_as(uid: int, gid: int, config: Path, site: Path, run_dir: Path
                 ) -> dict[str, dict[str, str]]:
    """`duet doctor` run by another user: a forked child drops to uid/gid with no other groups
    (for good, as a login would be) and reports the checks through a pipe. The interpreter
    lives under /root, which that user cannot read: the modules are imported first, as root."""
    diagnose(config, site, str(run_dir))  # warm every lazy import
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never back into pytest
        code = 1
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setresgid(gid, gid, gid)
            os.setresuid(uid, uid, uid)
            checks = diagnose(config, site, str(run_dir))
            os.write(write_fd, json.dumps({c.name: c.__dict__ for c in checks}).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data
    return json.loads(data)


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another uid")
def test_an_operator_not_in_dialout_sees_the_follower_users_access(tmp_path: Path) -> None:
    """doctor checked the caller: an operator (not in dialout, and needs not be) got "FAIL
    /dev/ttyDUET0 is not read/writable by uid 1000" on a healthy robot. It answers for the
    follower's account, as its unit runs it (User=, SupplementaryGroups=), and says so."""
    import grp
    import pwd
    import shutil
    import tempfile

    from drivers.device_access import Account

    master, slave = os.openpty()
    work = Path(tempfile.mkdtemp(prefix="duet-doctor-"))  # /tmp/pytest-of-root is 0700
    try:
        device = os.ttyname(slave)
        dialout = grp.getgrnam("dialout").gr_gid
        os.chown(device, 0, dialout)  # as udev sets a USB serial adapter
        os.chmod(device, 0o660)
        data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
        data["bus"]["device"] = device
        data.pop("sim", None)
        config = work / "robot.yaml"
        config.write_text(yaml.safe_dump(data))
        root = work / "root"
        assert main(["install", "--root", str(root), "--config", str(config), "--bundle",
                     str(make_bundle(work / "b")), "--no-venv"]) == 0
        # the unit's service user, with one that exists on this host
        unit = root / "etc/systemd/system/duet-follower.service"
        text = unit.read_text()
        assert "User=duet\n" in text and "SupplementaryGroups=dialout" in text
        service = pwd.getpwnam("daemon")
        assert dialout not in os.getgrouplist("daemon", service.pw_gid)  # only via the unit
        unit.write_text(text.replace("User=duet\n", "User=daemon\n").replace(
            "Group=duet\n", "Group=daemon\n"))
        for path in [work, *(p for p in work.rglob("*") if not p.is_symlink())]:
            path.chmod(path.stat().st_mode | 0o005)  # an operator reads the installed files
        operator = pwd.getpwnam("nobody")
        assert not Account(operator.pw_name, operator.pw_uid, frozenset(
            os.getgrouplist("nobody", operator.pw_gid))).can_read_write(device)
        etc = root / "etc/duet"
        checks = _diagnose_as(operator.pw_uid, operator.pw_gid, etc / "duet.yaml",
                              etc / "site.yaml", work / "run")
        bus = checks["bus device"]
        assert bus["level"] == OK, bus
        assert "daemon (the follower's user; groups daemon, dialout)" in bus["detail"]
        # and the same device without the unit's dialout: a FAIL naming the account and fix
        unit.write_text(unit.read_text().replace("SupplementaryGroups=dialout",
                                                 "SupplementaryGroups="))
        bus = _diagnose_as(operator.pw_uid, operator.pw_gid, etc / "duet.yaml",
                           etc / "site.yaml", work / "run")["bus device"]
        assert bus["level"] == FAIL and "not read/writable by daemon" in bus["detail"], bus
        assert "SupplementaryGroups=dialout" in bus["fix"]
    finally:
        os.close(master)
        os.close(slave)
        shutil.rmtree(work, ignore_errors=True)
