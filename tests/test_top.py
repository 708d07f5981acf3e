"""`duet top` in a real terminal (tmux) and `duet status` against a real telemetry publisher."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = Path(__file__).with_name("test_deploy_publisher.py")


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(PUBLISHER), str(run_dir), "--duration", "30"],
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline() == b"publishing\n"
    try:
        yield run_dir
    finally:
        proc.kill()
        proc.wait()


def _duet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed (apt: tmux)")
def test_top_draws_live_telemetry_in_tmux(publisher: Path, tmp_path: Path) -> None:
    session = f"duet-top-{tmp_path.name}"
    sock = str(tmp_path / "tmux.sock")  # a private tmux server, nothing shared
    tmux = ["tmux", "-S", sock]
    cmd = f"{sys.executable} -m runtime.cli top --run-dir {publisher} --refresh-hz 5"
    subprocess.run([*tmux, "new-session", "-d", "-s", session, "-x", "100", "-y", "40",
                    "-c", str(REPO), cmd], check=True, timeout=30)
    try:
        screen = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            screen = subprocess.run([*tmux, "capture-pane", "-p", "-t", session],
                                    capture_output=True, text=True, timeout=10).stdout
            if "TRACK" in screen and "put the red cube in the bin" in screen:
                break
            time.sleep(0.3)
        assert "TRACK" in screen, screen
        assert "499.7 / 500 Hz" in screen
        assert "p99 87.2" in screen  # jitter
        assert "wrist_pitch" in screen and "+4.0" in screen  # tracking error, mrad
        assert "put the red cube in the bin" in screen
        # q quits: the pane's process exits and the session goes away
        subprocess.run([*tmux, "send-keys", "-t", session, "q"], check=True, timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            alive = subprocess.run([*tmux, "has-session", "-t", session],
                                   capture_output=True, timeout=10).returncode == 0
            if not alive:
                break
            time.sleep(0.2)
        assert not alive, "duet top did not quit on q"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True, timeout=10)


def test_status_json_and_exit_code(publisher: Path) -> None:
    out = _duet("status", "--run-dir", str(publisher), "--json")
    assert out.returncode == 0, out.stderr
    sample = json.loads(out.stdout)
    assert sample["follower"]["mode"] == "TRACK"
    assert sample["follower"]["tracking_error"] == pytest.approx([0.001 * i for i in
                                                                  range(1, 7)], rel=1e-5)
    assert sample["planner"]["latency_ms"]["p99"] == 63.0
    text = _duet("status", "--run-dir", str(publisher))
    assert "TRACK" in text.stdout and "planning" in text.stdout


def test_status_without_processes_fails_fast(tmp_path: Path) -> None:
    t0 = time.monotonic()
    out = _duet("status", "--run-dir", str(tmp_path), "--timeout", "0.5")
    assert out.returncode == 1
    assert "no telemetry" in out.stdout
    assert time.monotonic() - t0 < 20
