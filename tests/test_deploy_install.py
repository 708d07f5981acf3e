"""`duet install --root` into a staging tree: every file the robot gets, for real."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from onnx_bundle import make_bundle

from runtime.cli import main
from runtime.config import load_config
from runtime.deploy.install import (
    InstallPlan,
    install,
    render_cpu_dropin,
    render_realtime_dropin,
)
from runtime.deploy.layout import Layout

REPO = Path(__file__).resolve().parents[1]


def _robot_config(tmp: Path, **follower_rt: object) -> Path:
    data = yaml.safe_load((REPO / "configs" / "sim.yaml").read_text())
    data["bus"]["device"] = "/dev/ttyDUET0"
    data.pop("sim", None)
    if follower_rt:
        data["follower"]["realtime"] = follower_rt
    path = tmp / "robot.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_install_stages_a_complete_tree(tmp_path: Path) -> None:
    root = tmp_path / "root"
    config = _robot_config(tmp_path, sched_fifo_priority=85, cpu=3, mlockall=True)
    bundle = make_bundle(tmp_path / "bundle")
    rc = main(["install", "--root", str(root), "--config", str(config), "--bundle", str(bundle),
               "--no-venv", "--usb-serial", "FT7ABC12"])
    assert rc == 0
    units = root / "etc/systemd/system"
    for unit in ("duet.target", "duet-follower.service", "duet-planner.service",
                 "duet-recorder.service"):
        assert (units / unit).is_file()
    dropin = (units / "duet-follower.service.d/realtime.conf").read_text()
    assert "CPUSchedulingPriority=85" in dropin and "CPUAffinity=3" in dropin
    for unit in ("duet-planner.service", "duet-recorder.service"):
        assert "CPUAffinity=" in (units / f"{unit}.d/cpu.conf").read_text()
    # enabled the way systemctl does it: absolute links in .wants
    assert os.readlink(units / "multi-user.target.wants/duet.target") == \
        "/etc/systemd/system/duet.target"
    assert (units / "duet.target.wants/duet-follower.service").is_symlink()
    assert (units / "duet.target.wants/duet-planner.service").is_symlink()
    assert not (units / "duet.target.wants/duet-recorder.service").exists()  # disabled in cfg
    rules = (root / "etc/udev/rules.d/99-duet-serial.rules").read_text()
    assert 'ATTRS{serial}=="FT7ABC12"' in rules and 'SYMLINK+="ttyDUET0"' in rules
    assert 'ATTR{latency_timer}="1"' in rules
    assert "u duet" in (root / "etc/sysusers.d/duet.conf").read_text()
    assert "recordings 0770 duet duet" in (root / "etc/tmpfiles.d/duet.conf").read_text()
    assert (root / "etc/duet/duet.yaml").read_text() == config.read_text()
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    assert os.readlink(root / "var/lib/duet/bundles/current") == version
    assert (root / "opt/duet/README.md").is_file()
    # what the services will load: robot config + site file pointing at the current bundle
    cfg = load_config(root / "etc/duet/duet.yaml", root / "etc/duet/site.yaml")
    assert cfg.bundle.path == "/var/lib/duet/bundles/current"


def test_reinstall_keeps_backups_and_site_edits(tmp_path: Path) -> None:
    root, config = tmp_path / "root", _robot_config(tmp_path)
    plan = InstallPlan(layout=Layout(root), prefix="/opt/duet", config=config, venv=False,
                       log=lambda _: None)
    install(plan)
    site = root / "etc/duet/site.yaml"
    site.write_text(site.read_text() + "follower:\n  blend_ms: 55\n")
    config.write_text(config.read_text().replace("blend_ms: 80", "blend_ms: 70"))
    install(plan)
    assert "blend_ms: 55" in site.read_text()  # operator's site changes survive
    assert (root / "etc/duet/duet.yaml.bak").is_file()
    assert "blend_ms: 70" in (root / "etc/duet/duet.yaml").read_text()


def test_invalid_config_installs_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/sim.yaml").read_text().replace("hz: 500", "hz: -1"))
    rc = main(["install", "--root", str(tmp_path / "root"), "--config", str(bad), "--no-venv"])
    assert rc == 1
    assert "follower.hz" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_custom_prefix_and_can_bus(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"] = {"kind": "mit_can", "channel": "duetcan0", "bitrate": 1000000,
                   "ids": [1, 2, 3, 4, 5, 6], "model": {"p_max": 12.5, "v_max": 45, "t_max": 18},
                   "kp": [20.0] * 6, "kd": [1.0] * 6}
    data["follower"]["hz"] = 400  # what one 1 Mbit/s bus carries for 6 motors
    config = tmp_path / "can.yaml"
    config.write_text(yaml.safe_dump(data))
    root = tmp_path / "root"
    install(InstallPlan(layout=Layout(root), prefix="/srv/robot", config=config, venv=False,
                        log=lambda _: None))
    unit = (root / "etc/systemd/system/duet-follower.service").read_text()
    assert "ExecStart=/srv/robot/venv/bin/duet follower" in unit and "/opt/duet" not in unit
    link = (root / "etc/systemd/network/80-duet-can.link").read_text()
    assert "Name=duetcan0" in link
    rules = (root / "etc/udev/rules.d/99-duet-can.rules").read_text()
    assert "bitrate 1000000" in rules and 'KERNEL=="duetcan0"' in rules
    assert not (root / "etc/udev/rules.d/99-duet-serial.rules").exists()


def test_planner_and_recorder_stay_off_the_follower_core(tmp_path: Path) -> None:
    cfg = load_config(_robot_config(tmp_path, cpu=3))
    assert "CPUAffinity=0 1 2 4 5\n" in render_cpu_dropin(cfg, 6)
    assert "CPUAffinity=\n" in render_cpu_dropin(cfg, 2)  # no such core here: no restriction
    unpinned = load_config(_robot_config(tmp_path, sched_fifo_priority=0))
    assert "CPUAffinity=\n" in render_cpu_dropin(unpinned, 6)


def test_realtime_dropin_without_fifo_turns_it_off(tmp_path: Path) -> None:
    text = render_realtime_dropin(load_config(_robot_config(tmp_path, sched_fifo_priority=0)))
    assert "CPUSchedulingPolicy=other" in text and "CPUAffinity=\n" in text


def test_follower_waits_for_its_bus_device(tmp_path: Path) -> None:
    from runtime.deploy.install import device_unit, render_device_dropin

    cfg = load_config(_robot_config(tmp_path))
    assert device_unit(cfg) == "dev-ttyDUET0.device"
    assert "After=dev-ttyDUET0.device" in render_device_dropin(cfg)
    can = load_config(REPO / "configs" / "sim_can.yaml", None, ["bus.channel=can-arm"])
    assert device_unit(can) == "sys-subsystem-net-devices-can\\x2darm.device"
