"""The sd_notify protocol of a real `duet follower` (driving the sim over its pty) against a
NOTIFY_SOCKET bound here, the way systemd runs duet-follower.service (Type=notify,
WatchdogSec=2s): READY=1 once holding, STATUS with the mode, WATCHDOG=1 well inside the
watchdog interval, STOPPING=1 and exit 0 on SIGTERM."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from onnx_bundle import make_bundle
from stack import stop_processes

from runtime.ipc import endpoints

pytestmark = pytest.mark.system  # a follower process under a fake systemd

REPO = Path(__file__).resolve().parents[1]
WATCHDOG_SEC = 2.0  # as in systemd/duet-follower.service


def _recv_all(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    out = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        out.extend((time.monotonic(), line) for line in data.decode().split("\n"))
    return out


def test_follower_notifies_ready_watchdog_and_stopping(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    env = {**os.environ, "MUJOCO_GL": "egl", "PYTHONUNBUFFERED": "1"}
    sets = ["--set", f"run_dir={run_dir}", "--set", f"bundle.path={make_bundle(tmp_path / 'b')}",
            "--set", "follower.deadline_storm.misses=400"]  # behaviour, not timing (stack.py)
    sim = subprocess.Popen([sys.executable, "-m", "runtime.cli", "sim", "--config",
                            str(REPO / "configs/sim.yaml"), *sets], cwd=REPO, env=env,
                           stdout=subprocess.PIPE)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    follower = None
    try:
        assert sim.stdout is not None
        device = sim.stdout.readline().decode().strip()
        assert os.path.realpath(device).startswith("/dev/pts/"), device
        fenv = {**env, "NOTIFY_SOCKET": str(tmp_path / "notify"),
                "WATCHDOG_USEC": str(int(WATCHDOG_SEC * 1e6))}
        follower = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "follower", "--config",
             str(REPO / "configs/sim.yaml"), *sets, "--set", f"bus.device={device}"],
            cwd=REPO, env=fenv)
        t_start = time.monotonic()
        msgs: list[tuple[float, str]] = []
        while not any(m == "READY=1" for _, m in msgs):
            assert time.monotonic() - t_start < 30, f"no READY=1 within 30 s: {msgs}"
            assert follower.poll() is None, "follower exited before READY=1"
            msgs += _recv_all(notify, 0.5)
        msgs += _recv_all(notify, 3.0)
        statuses = [m for _, m in msgs if m.startswith("STATUS=")]
        assert any("HOLD" in s for s in statuses), statuses
        pings = [t for t, m in msgs if m == "WATCHDOG=1"]
        assert len(pings) >= 6, msgs
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < WATCHDOG_SEC / 2, f"watchdog gaps {max(gaps):.2f} s"
        follower.send_signal(signal.SIGTERM)
        assert follower.wait(timeout=15) == 0
        tail = [m for _, m in _recv_all(notify, 0.5)]
        assert "STOPPING=1" in tail, tail
    finally:
        stop_processes(follower, sim)
        notify.close()


def test_duet_runs_follower_opens_its_bus_only_when_told_the_motors_are_served(
        tmp_path: Path) -> None:
    """`duet run` starts the follower beside the sim with --bus-after-stdin: it sets up
    everything but the bus and waits; the line opens the bus (here a missing device: exit 2,
    said), EOF or SIGTERM before it is a clean stop that never touched the bus."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    bundle = make_bundle(tmp_path / "b")
    procs = {}
    for name in ("line", "eof"):
        run_dir = tmp_path / name
        procs[name] = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "follower", "--config",
             str(REPO / "configs/sim.yaml"), "--set", f"run_dir={run_dir}",
             "--set", f"bundle.path={bundle}", "--set", f"bus.device={run_dir / 'ttyDUET0'}",
             "--bus-after-stdin"], cwd=REPO, env=env, stdin=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    try:
        for name, proc in procs.items():  # set up: its control socket is bound
            control = Path(endpoints.control(str(tmp_path / name)).removeprefix("ipc://"))
            deadline = time.monotonic() + 60
            while not control.exists():
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "follower not set up within 60 s"
                time.sleep(0.05)
        for proc in procs.values():
            assert proc.poll() is None  # waiting, not failing on the missing device
        _, err = procs["line"].communicate("served\n", timeout=60)
        assert procs["line"].returncode == 2
        assert "motors not readable at start" in err
        _, err = procs["eof"].communicate("", timeout=60)
        assert procs["eof"].returncode == 0
        assert "stopped before its motors were served" in err
        assert "motors not readable" not in err
    finally:
        stop_processes(*procs.values())
