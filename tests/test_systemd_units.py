"""The shipped units as systemd sees them: `systemd-analyze verify` on an installed tree,
and offline enabling compared with `systemctl --root enable`."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from runtime.deploy.install import InstallPlan, install
from runtime.deploy.layout import Layout
from runtime.deploy.units import UNITS, enable_offline

REPO = Path(__file__).resolve().parents[1]
needs_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package: systemd)")


def _installed(tmp: Path) -> Path:
    """Install with the prefix inside tmp, its venv/bin/duet being this checkout's duet."""
    data = yaml.safe_load((REPO / "configs/sim.yaml").read_text())
    data["bus"]["device"] = "/dev/ttyDUET0"  # a real robot's config: install refuses a sim's
    data.pop("sim", None)
    data["bundle"]["path"] = str(REPO / "bundles/reference")
    data["follower"]["realtime"] = {"sched_fifo_priority": 70, "cpu": 1, "mlockall": True}
    config = tmp / "robot.yaml"
    config.write_text(yaml.safe_dump(data))
    root, prefix = tmp / "root", tmp / "prefix"
    (prefix / "venv/bin").mkdir(parents=True)
    duet = REPO / ".venv/bin/duet"
    if not duet.exists():
        pytest.skip("the duet entry point is not installed in .venv")
    (prefix / "venv/bin/duet").symlink_to(duet)
    install(InstallPlan(layout=Layout(root), prefix=str(prefix), config=config, venv=False,
                        log=lambda _: None))
    return root / "etc/systemd/system"


@pytest.mark.system
@needs_analyze
def test_units_and_dropin_verify_clean(tmp_path: Path) -> None:
    units = _installed(tmp_path)
    paths = [str(units / u) for u in UNITS]
    out = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True,
                         text=True, timeout=60)
    # verify exits 0 on mere warnings; any line about our files is a defect
    ours = [ln for ln in (out.stdout + out.stderr).splitlines() if "duet" in ln]
    assert out.returncode == 0 and not ours, out.stdout + out.stderr


@pytest.mark.system
@needs_analyze
def test_verify_catches_a_broken_dropin(tmp_path: Path) -> None:
    """The check above can fail: a bad drop-in value is reported."""
    units = _installed(tmp_path)
    (units / "duet-follower.service.d/realtime.conf").write_text(
        "[Service]\nCPUSchedulingPriority=high\n")
    out = subprocess.run(["systemd-analyze", "verify", str(units / "duet-follower.service")],
                         capture_output=True, text=True, timeout=60)
    assert "realtime.conf:2: Failed to parse CPU scheduling priority" in out.stdout + out.stderr


def test_follower_unit_contract() -> None:
    text = (REPO / "systemd/duet-follower.service").read_text()
    for line in ("Type=notify", "NotifyAccess=main", "WatchdogSec=", "Restart=on-failure",
                 "CPUSchedulingPolicy=fifo", "LimitMEMLOCK=infinity", "LimitRTPRIO=",
                 "SupplementaryGroups=dialout", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "ProtectHome=yes", "PrivateTmp=yes", "UMask=0007", "DeviceAllow=/dev/ttyDUET0 rw",
                 "ReadWritePaths=/run/duet -/var/lib/duet/recordings", "PartOf=duet.target"):
        assert line in text, line
    assert "RestrictRealtime=yes" not in text  # would forbid SCHED_FIFO
    planner = (REPO / "systemd/duet-planner.service").read_text()
    assert "PartOf=duet.target" in planner and "Type=notify" in planner


@pytest.mark.system
@pytest.mark.skipif(shutil.which("systemctl") is None, reason="systemctl not installed")
def test_offline_enable_matches_systemctl(tmp_path: Path) -> None:
    mine, theirs = tmp_path / "mine", tmp_path / "theirs"
    for tree in (mine, theirs):
        (tree / "etc/systemd/system").mkdir(parents=True)
        for unit in UNITS:
            shutil.copy(REPO / "systemd" / unit, tree / "etc/systemd/system" / unit)
    for unit in UNITS:
        enable_offline(mine / "etc/systemd/system", unit)
    subprocess.run(["systemctl", f"--root={theirs}", "enable", *UNITS], check=True,
                   capture_output=True, timeout=60)

    def links(tree: Path) -> set[tuple[str, str]]:
        return {(str(p.relative_to(tree)), os.readlink(p)) for p in tree.rglob("*")
                if p.is_symlink()}

    assert links(mine) == links(theirs) and links(mine)


@pytest.mark.system
def test_container_verification_script_parses() -> None:
    """systemd/verify-in-container.sh (run by hand: minutes, root) is at least valid bash."""
    script = REPO / "systemd/verify-in-container.sh"
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert os.access(script, os.X_OK)
