"""`duet sim` as a real process: pty device line first, real servo protocol, frames, tasks,
episodes, clean SIGTERM and the summary file."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import serial
import zmq

from drivers.bus import MotorState
from drivers.dynamixel import DynamixelBus
from runtime.ipc import endpoints
from runtime.ipc.messages import decode, unpack_array
from sim.robot import default_robot
from sim.task import Episode, episode_seed
from sim.world import SimWorld

HOME_Q = default_robot().home
JOINTS = default_robot().joints

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]


def _start_sim(run_dir: Path, *overrides: str) -> tuple[subprocess.Popen[bytes], str]:
    sets = [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "sim", "--config", str(REPO / "configs/sim.yaml"),
         "--run-dir", str(run_dir), *sets],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().decode().strip()
    if not line:
        proc.kill()
        raise AssertionError(f"no device line; stderr: {proc.communicate()[1].decode()}")
    return proc, line


def _stop(proc: subprocess.Popen[bytes]) -> str:
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0, err.decode()
    return err.decode()


@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    proc, device = _start_sim(tmp_path, "sim.episode_timeout_s=1.0")
    try:
        yield proc, device, tmp_path
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _collect(sub: zmq.Socket[bytes], seconds: float) -> list[dict]:
    msgs = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if sub.poll(50):
            msgs.append(decode(sub.recv()))
    return msgs


def test_duet_sim_serves_servos_frames_and_episodes(
        sim: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    proc, device, run_dir = sim
    # a stable name in the run dir (as udev gives an adapter) for the pty behind it
    assert device == str(run_dir / "ttyDUET0")
    assert os.path.realpath(device).startswith("/dev/pts/")
    with serial.Serial(device, 4_000_000, timeout=0.1):
        pass  # pyserial opens the pty like a USB serial adapter

    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoints.sim(str(run_dir)))

    bus = DynamixelBus(device, 4_000_000, ids=[1, 2, 3, 4, 5, 6], joint_names=list(JOINTS))
    bus.open()
    state = MotorState(len(JOINTS))
    bus.read(state)
    # the arm powers up at home; torque off, it sags under gravity until backlash and friction
    # hold it (~25 mrad within 0.5 s), so how far depends on when a loaded host gets here
    assert np.abs(state.q - HOME_Q).max() < 0.03
    goal = state.q.copy()
    goal[0] += 0.4
    bus.enable_torque(True)
    msgs = []
    for _ in range(15):  # ~1.5 s of commands, the servos move the simulated arm
        bus.write(goal)
        msgs += _collect(sub, 0.1)
    bus.read(state)
    bus.close()
    assert abs(state.q[0] - goal[0]) < 0.03

    # at least 15 frames: 1.5 s at camera_hz on a quiet host, longer on a loaded one (the
    # renderer then skips frames rather than falling behind)
    deadline = time.monotonic() + 60.0
    while sum(m["type"] == "frame" for m in msgs) < 15 and time.monotonic() < deadline:
        msgs += _collect(sub, 0.5)
    sub.close()
    ctx.term()
    summary_log = _stop(proc)

    frames = [m for m in msgs if m["type"] == "frame"]
    tasks = [m for m in msgs if m["type"] == "task"]
    results = [m for m in msgs if m["type"] == "episode"]
    assert len(frames) >= 15
    period_ms = np.median(np.diff([f["capture_t_ns"] for f in frames])) / 1e6
    assert period_ms > 90  # sim.camera_hz = 10: never faster (slower only on a busy host)
    image = unpack_array(frames[-1]["image"], "image")
    assert image.shape == (96, 96, 3) and image.dtype == np.uint8
    # the published frame is the scene camera's view of that state and episode: what the
    # policy was trained on (`SimWorld.render`), not some other viewpoint
    world = SimWorld()
    world.place_blocks(Episode(episode_seed(0, frames[-1]["episode"]), 0.5).blocks)
    world.set_joint_state(state.q)
    assert np.abs(image.astype(int) - world.render().astype(int)).mean() < 2.0
    assert all(isinstance(f["capture_t_ns"], int) and f["capture_t_ns"] <= f["t_ns"]
               for f in frames)
    assert tasks and all(t["instruction"].startswith("touch the ") for t in tasks)
    # 1 s episodes that nobody solves: each ends in a timeout and the next is announced
    assert len(results) >= 1
    assert all(r["success"] is False and r["reason"] == "timeout" for r in results)
    episodes = {t["episode"] for t in tasks}
    assert {r["episode"] + 1 for r in results} <= episodes

    summary = json.loads((run_dir / "sim-summary.json").read_text())
    assert set(summary) == {"episodes", "successes", "success_rate", "motor_reply_us"}
    # every request the servos answered, timed by the serving thread (read -> reply written)
    reply = summary["motor_reply_us"]
    assert 0 < reply["p50"] <= reply["p99"] <= reply["max"]
    assert summary["episodes"] >= len(results) and summary["successes"] == 0
    assert '"achieved_hz"' in summary_log


def test_duet_sim_rejects_a_bad_config(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "sim", "--config", str(REPO / "configs/sim.yaml"),
         "--run-dir", str(tmp_path), "--set", "sim.physics_hz=-5"],
        cwd=REPO, capture_output=True, timeout=60, env={**os.environ},
    )
    assert proc.returncode == 2
    assert proc.stdout == b""
    assert b"sim.physics_hz" in proc.stderr


def test_duet_sim_serves_per_limb_can_fd_buses(tmp_path: Path) -> None:
    """configs/sim_can_fd.yaml: two Damiao FD buses, one per limb, from one `duet sim`; the
    follower's bus (a MultiBus over both) reads the homed arm and drives both limbs, and the
    sim's fault socket reaches the motors of each."""
    from drivers.bus import MotorFault
    from runtime.config import load_config
    from runtime.follower.buses import open_bus
    from runtime.ipc.rpc import request_at

    cfg_path = REPO / "configs/sim_can_fd.yaml"
    proc = subprocess.Popen(
        [sys.executable, "-m", "runtime.cli", "sim", "--config", str(cfg_path),
         "--run-dir", str(tmp_path), "--set", "sim.rt_priority=0"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()
        assert line == "127.0.0.1:47021>127.0.0.1:47020,127.0.0.1:47031>127.0.0.1:47030", line
        cfg = load_config(cfg_path)
        for section in cfg.buses or []:  # a loaded test host, not a real-time follower
            section.timeout_ms = 100.0
        bus = open_bus(cfg)
        bus.open()  # reads each Damiao motor's PMAX/VMAX/TMAX registers: they match
        state = MotorState(6)
        bus.read(state)
        np.testing.assert_allclose(state.q, HOME_Q, atol=0.05)  # homed, sagging under gravity
        assert np.isfinite(state.temperature_c).all()
        goal = np.zeros(6)
        # homed: enabled (the Damiao nibble says so), holding HOME_Q; the goal is
        # reconstructed from each reply's torque (q + tau/kp), not the sagging position
        assert bus.present_goal(goal) is True
        np.testing.assert_allclose(goal, HOME_Q, atol=1e-3)
        bus.enable_torque(True)
        target = HOME_Q + np.array([0.1, 0.0, 0.0, 0.0, 0.0, 0.1])
        for _ in range(400):  # 0.8 s at 500 Hz
            bus.write(target)
            bus.read(state)
            time.sleep(0.002)
        assert abs(state.q[0] - target[0]) < 0.02 and abs(state.q[5] - target[5]) < 0.02
        assert bus.present_goal(goal) is True
        np.testing.assert_array_equal(goal, target)  # this process's own last command
        reply = request_at(endpoints.sim_control(str(tmp_path)), "overload", {"joint": 4})
        assert reply["ok"], reply
        bus.write(target)
        with pytest.raises(MotorFault, match=r"wrist_roll \(id 5\): overload"):
            bus.read(state)
        bus.close()
    finally:
        _stop(proc)
