"""`duet install --root` into a staging tree: every file the robot gets, for real."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml
from onnx_bundle import make_bundle

from runtime.cli import main
from runtime.config import load_config
from runtime.deploy.install import InstallPlan, install
from runtime.deploy.layout import Layout
from runtime.deploy.units import render_cpu_dropin, render_realtime_dropin

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


def test_install_stages_a_complete_tree(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    config = _robot_config(tmp_path, sched_fifo_priority=85, cpu=3, mlockall=True)
    bundle = make_bundle(tmp_path / "bundle")
    rc = main(["install", "--root", str(root), "--config", str(config), "--bundle", str(bundle),
               "--no-venv", "--usb-serial", "FT7ABC12"])
    assert rc == 0
    # the bundle it staged is checked where it staged it, not in this host's live store
    out = capsys.readouterr()
    assert "warning" not in out.out + out.err, out
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
    assert rc == 2  # bad input
    assert "follower.hz" in capsys.readouterr().err
    assert not (tmp_path / "root").exists()


def test_sim_config_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["install", "--root", str(tmp_path / "root"), "--config",
               str(REPO / "configs/sim.yaml"), "--no-venv"])
    assert rc == 1
    err = capsys.readouterr().err
    assert "simulated robot's config" in err and "bus.device is `sim`" in err
    assert "sim.enabled is true" in err and not (tmp_path / "root").exists()


STEPS = {  # the live steps, in order: (tool, first argument) -> what its failure prints
    "systemd-sysusers": ("systemd-sysusers", "duet.conf"),
    "systemd-tmpfiles": ("systemd-tmpfiles", "--create"),
    "udevadm control": ("udevadm", "control"),
    "udevadm trigger": ("udevadm", "trigger"),
    "systemctl daemon-reload": ("systemctl", "daemon-reload"),
    "systemctl enable": ("systemctl", "enable"),
}


def _fake_tools(tmp: Path, fail: str | None, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Real executables named like the system tools, first on PATH: each appends its argv to
    calls.log; the one named by `fail` prints an error and exits 1."""
    bin_dir = tmp / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp / "calls.log"
    for tool in {t for t, _ in STEPS.values()}:
        script = bin_dir / tool
        fail_arg = STEPS[fail][1] if fail and STEPS[fail][0] == tool else ""
        script.write_text(f"""#!/bin/sh
echo "{tool} $*" >> {log}
case "$*" in *"{fail_arg or '@never@'}"*) echo "{tool}: Failed: simulated" >&2; exit 1;; esac
exit 0
""")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    return log


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with its content or link target."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = "-> " + os.readlink(p)
        elif p.is_file():
            out[rel] = p.read_text(errors="replace")
        else:
            out[rel] = "/"
    return out


def _live_plan(root: Path, config: Path, bundle: Path | None = None) -> InstallPlan:
    return InstallPlan(layout=Layout(root), prefix="/opt/duet", config=config, bundle=bundle,
                       venv=False, live_steps=True, log=lambda _: None)


@pytest.mark.parametrize("step", list(STEPS))
def test_each_failing_step_rolls_back_to_the_previous_install(
        step: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first install succeeds; a second, with a changed config, fails at `step`: the error
    is one line naming the command and the fix, and every file is as the first left it."""
    from runtime.deploy.install import InstallError

    root, config = tmp_path / "root", _robot_config(tmp_path, cpu=1, sched_fifo_priority=80)
    bundle = make_bundle(tmp_path / "bundle")
    _fake_tools(tmp_path, None, monkeypatch)
    install(_live_plan(root, config, bundle))
    before = _tree(root)
    (tmp_path / "changed").mkdir()
    changed = _robot_config(tmp_path / "changed", cpu=0, sched_fifo_priority=70)
    log = _fake_tools(tmp_path, step, monkeypatch)
    log.unlink()
    with pytest.raises(InstallError) as exc:
        install(_live_plan(root, changed))
    text = str(exc.value)
    assert "\n" not in text and f"`{STEPS[step][0]}" in text and "fix:" in text
    assert "Failed: simulated" in text and text.endswith("nothing enabled")
    assert _tree(root) == before  # nothing half-installed: the previous install, exactly
    calls = log.read_text().splitlines()
    tools = [" ".join(c.split()[:2]) for c in calls]
    failed_at = [" ".join(t for t in STEPS[k] if t != "duet.conf") for k in STEPS].index(
        " ".join(t for t in STEPS[step] if t != "duet.conf"))
    if step == "systemctl enable":  # systemd had seen the new units: it reloads the old
        assert tools[-1] == "systemctl daemon-reload" and len(calls) == failed_at + 2
    else:
        assert len(calls) == failed_at + 1  # nothing ran after the failing step


def test_failed_first_install_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                             ) -> None:
    from runtime.deploy.install import InstallError

    root = tmp_path / "root"
    root.mkdir()
    _fake_tools(tmp_path, "udevadm control", monkeypatch)
    with pytest.raises(InstallError, match=r"udevadm control --reload.*--no-udev-reload"):
        install(_live_plan(root, _robot_config(tmp_path)))
    assert _tree(root) == {}  # not a file, not a folder left


def test_missing_tool_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from runtime.deploy.install import InstallError

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(InstallError, match=r"`systemd-sysusers .*` could not run .*fix:"):
        install(_live_plan(tmp_path / "root", _robot_config(tmp_path)))
    assert not list((tmp_path / "root").rglob("*.service"))


def test_duet_on_path_and_uninstall(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, config = tmp_path / "root", _robot_config(tmp_path)
    assert main(["install", "--root", str(root), "--config", str(config), "--bundle",
                 str(make_bundle(tmp_path / "b")), "--no-venv"]) == 0
    assert os.readlink(root / "usr/local/bin/duet") == "/opt/duet/venv/bin/duet"
    (root / "var/lib/duet/recordings/episodes").mkdir(parents=True)
    (root / "var/lib/duet/recordings/episodes/e.mcap").write_bytes(b"x")
    assert main(["uninstall", "--root", str(root)]) == 0
    left = _tree(root)
    assert not [p for p in left if p.endswith((".service", ".target", ".rules", "duet.conf"))]
    assert "usr/local/bin/duet" not in left and "opt/duet" not in left
    assert "var/lib/duet/bundles" not in left
    assert "etc/duet/site.yaml" in left and "var/lib/duet/recordings/episodes/e.mcap" in left
    # the duet command is gone with the venv: the purge it prints needs no duet
    printed = capsys.readouterr().out
    rm = printed[printed.index("to remove them too: ") + 20:].splitlines()[0]
    assert rm == f"sudo rm -rf {root}/etc/duet {root}/var/lib/duet"
    subprocess.run(shlex.split(rm.removeprefix("sudo ")), check=True)
    assert "etc/duet" not in _tree(root) and "var/lib/duet" not in _tree(root)
    # or in one step
    assert main(["install", "--root", str(root), "--config", str(config), "--bundle",
                 str(make_bundle(tmp_path / "b2")), "--no-venv"]) == 0
    assert main(["uninstall", "--root", str(root), "--purge"]) == 0
    assert "etc/duet" not in _tree(root) and "var/lib/duet" not in _tree(root)


@pytest.mark.system
def test_non_editable_bootstrap_finds_the_checkout(tmp_path: Path) -> None:
    """duet installed as a plain package (no systemd/ beside it), run inside the checkout."""
    import shutil
    import subprocess
    import sys

    site = tmp_path / "site-packages"
    for pkg in ("runtime", "drivers", "sim", "policy", "export"):
        shutil.copytree(REPO / pkg, site / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    env = {**os.environ, "PYTHONPATH": str(site)}
    args = [sys.executable, "-m", "runtime.cli", "install", "--root", str(tmp_path / "root"),
            "--config", str(_robot_config(tmp_path)), "--no-venv"]
    out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "root/etc/systemd/system/duet-follower.service").is_file()
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and "pass --source DIR" in out.stderr


def test_custom_prefix_and_can_bus(tmp_path: Path) -> None:
    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"] = {"kind": "mit_can", "channel": "duetcan0", "bitrate": 1000000,
                   "ids": [1, 2, 3, 4, 5, 6], "model": {"p_max": 12.5, "v_max": 45, "t_max": 18},
                   "kp": [20.0] * 6, "kd": [1.0] * 6}
    data["follower"]["hz"] = 400  # what one 1 Mbit/s bus carries for 6 motors
    data.pop("sim")
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
    from runtime.deploy.units import device_unit, render_device_dropin

    cfg = load_config(_robot_config(tmp_path))
    assert device_unit(cfg) == "dev-ttyDUET0.device"
    assert "After=dev-ttyDUET0.device" in render_device_dropin(cfg)
    can = load_config(REPO / "configs" / "sim_can.yaml", None, ["bus.channel=can-arm"])
    assert device_unit(can) == "sys-subsystem-net-devices-can\\x2darm.device"


@pytest.mark.parametrize("recorder", [False, True])
def test_printed_restart_names_only_enabled_units(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], recorder: bool) -> None:
    """The recorder is disabled by default: a `reset-failed` naming it exits 1 ("not loaded")
    and its `&&` skips the restart. `config set` and `bundle activate` in an install name the
    units systemd has enabled there (what `systemctl is-enabled` says); the live run of these
    commands is in systemd/verify-in-container.sh."""
    import subprocess

    from runtime.deploy.units import enabled_services

    config = _robot_config(tmp_path)
    if recorder:
        data = yaml.safe_load(config.read_text())
        data["recorder"] = {"enabled": True}
        config.write_text(yaml.safe_dump(data))
    root, bundle = tmp_path / "root", make_bundle(tmp_path / "b")
    assert main(["install", "--root", str(root), "--config", str(config), "--bundle",
                 str(bundle), "--no-venv"]) == 0
    services = ["duet-follower.service", "duet-planner.service"] + (
        ["duet-recorder.service"] if recorder else [])
    assert enabled_services(root) == services
    for unit in ("duet-follower.service", "duet-planner.service", "duet-recorder.service"):
        answer = subprocess.run(["systemctl", f"--root={root}", "is-enabled", unit],
                                capture_output=True, text=True, check=False).stdout.strip()
        assert (answer == "enabled") == (unit in services), (unit, answer)
    capsys.readouterr()
    etc = root / "etc/duet"
    assert main(["config", "set", "planner.hz=4", "--config", str(etc / "duet.yaml"),
                 "--site", str(etc / "site.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    reset = f"sudo systemctl reset-failed {' '.join(services)} && "
    assert f"restart needed: {reset}sudo systemctl restart duet-planner.service" in \
        capsys.readouterr().out
    # a recorder key with the recorder disabled: the target, never a unit that is not there
    assert main(["config", "set", "recorder.budget_mb=100", "--config", str(etc / "duet.yaml"),
                 "--site", str(etc / "site.yaml"), "--run-dir", str(tmp_path / "run")]) == 0
    restarted = "duet-recorder.service" if recorder else "duet.target"
    assert f"{reset}sudo systemctl restart {restarted}" in capsys.readouterr().out
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    assert main(["bundle", "activate", version, "--store", str(root / "var/lib/duet/bundles"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["restart"] == \
        f"{reset}sudo systemctl restart duet.target"


def test_workstation_restart_is_duet_run(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Where duet is not installed, no systemctl line: `duet run` is what restarts."""
    bundle = make_bundle(tmp_path / "store-src")
    store = tmp_path / "store"
    assert main(["bundle", "add", str(bundle), "--store", str(store)]) == 0
    version = json.loads((bundle / "manifest.json").read_text())["version"]
    capsys.readouterr()
    assert main(["bundle", "activate", version, "--store", str(store)]) == 0
    out = capsys.readouterr().out
    assert "systemctl" not in out and "duet stop" in out
