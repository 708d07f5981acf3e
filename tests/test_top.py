"""`duet top` in a real terminal (tmux) and `duet status` against a real telemetry publisher."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sim_arm import N_JOINTS

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = Path(__file__).with_name("test_deploy_publisher.py")


def _publish(run_dir: Path, *extra: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, str(PUBLISHER), str(run_dir), *extra],
                            stdout=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stdout.readline() == b"publishing\n"
    return proc


@pytest.fixture
def publisher(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    proc = _publish(run_dir, "--duration", "120")  # killed at teardown; long for a loaded host
    try:
        yield run_dir
    finally:
        proc.kill()
        proc.wait()


def _duet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=60)


needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="tmux not installed (apt: tmux)")


class Terminal:
    """`duet top` in a private tmux server at 80x24, read back with capture-pane."""

    def __init__(self, tmp_path: Path, run_dir: Path) -> None:
        self.session = f"duet-top-{tmp_path.name}"
        self.tmux = ["tmux", "-S", str(tmp_path / "tmux.sock")]  # nothing shared
        cmd = f"{sys.executable} -m runtime.cli top --run-dir {run_dir} --refresh-hz 5"
        subprocess.run([*self.tmux, "new-session", "-d", "-s", self.session, "-x", "80",
                        "-y", "24", "-c", str(REPO), cmd], check=True, timeout=30)

    def screen_when(self, *wanted: str, timeout_s: float = 45.0) -> str:
        screen = ""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            screen = subprocess.run([*self.tmux, "capture-pane", "-p", "-t", self.session],
                                    capture_output=True, text=True, timeout=10).stdout
            if all(w in screen for w in wanted):
                break
            time.sleep(0.3)
        return screen

    def quit(self) -> bool:
        """q; True once the pane's process exited and the session went away."""
        subprocess.run([*self.tmux, "send-keys", "-t", self.session, "q"], check=True,
                       timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if subprocess.run([*self.tmux, "has-session", "-t", self.session],
                              capture_output=True, timeout=10).returncode != 0:
                return True
            time.sleep(0.2)
        return False

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True, timeout=10)


def _fits(screen: str) -> None:
    lines = screen.rstrip("\n").splitlines()
    assert len(lines) <= 24 and "quit" in lines[-1], screen  # the footer: nothing cut
    assert max(len(line) for line in lines) <= 80, screen


@needs_tmux
def test_top_fits_80x24_and_says_why_and_what_next(tmp_path: Path) -> None:
    """A real terminal of 80x24 (tmux): everything is on screen, the health line turns from
    healthy to the fault with the next step, and q quits."""
    run_dir = tmp_path / "run"
    # the fault comes late enough for a slow start (textual, a loaded machine) to show TRACK
    pub = _publish(run_dir, "--fault-after", "30", "--duration", "90")
    term = Terminal(tmp_path, run_dir)
    try:
        screen = term.screen_when("TRACK", "put the red cube in the", "healthy", "wrist_pitch",
                                  "quit")
        assert "TRACK" in screen and "healthy" in screen, screen
        # the publisher's loop ticks at PERIODS_US in turn: its figures, as the follower's own
        # LoopFigures computes them
        assert "496.9 / 500 Hz" in screen
        assert "p50 10 p99 50 max 50" in screen  # jitter, µs
        assert re.search(r"wrist_pitch\s+[+-]\d\.\d{3}\s+[+-]\d+\.\d", screen), screen  # q, mrad
        assert "put the red cube in the" in screen  # folded at 80 columns
        _fits(screen)
        screen = term.screen_when("FAULT", "duet reset", "quit")
        assert "follower: FAULT: bus errors past threshold" in screen, screen
        assert "next: check the robot (the reason above), then: duet reset" in screen
        _fits(screen)
        assert term.quit(), "duet top did not quit on q"
    finally:
        term.close()
        pub.kill()
        pub.wait()


def _six_motors_silent() -> str:
    """The error a Dynamixel bus read gives when none of the arm's six servos answers: the
    real driver against the emulated servos on a pty."""
    from sim_arm import IDS, JOINTS

    from drivers.bus import BusError, MotorState
    from drivers.dynamixel import DynamixelBus
    from sim.actuators import Actuators
    from sim.dynamixel_emulator import DynamixelEmulator

    actuators = Actuators(N_JOINTS)
    emulator = DynamixelEmulator(actuators, IDS)
    emulator.open()
    emulator.start()
    bus = DynamixelBus(emulator.path, 4_000_000, IDS, JOINTS, timeout_ms=50.0, retries=0)
    try:
        bus.open()
        actuators.silent[:] = True
        with pytest.raises(BusError) as failed:
            bus.read(MotorState(N_JOINTS))
    finally:
        bus.close()
        emulator.stop()
    assert failed.value.args[0].count("no reply") == N_JOINTS == 6
    return str(failed.value.args[0])


@needs_tmux
def test_top_at_80x24_keeps_the_headline_and_next_step_when_six_motors_time_out(
        tmp_path: Path) -> None:
    """Six silent servos: the reason names each one (~270 characters). It used to wrap
    through a dozen rows of the follower panel and push what is wrong and what to do off
    the screen; it is summarised, and the headline and next step come first."""
    reason = _six_motors_silent()
    run_dir = tmp_path / "run"
    pub = _publish(run_dir, "--fault-after", "0", "--bus-error", reason, "--duration", "90")
    term = Terminal(tmp_path, run_dir)
    try:
        screen = term.screen_when("FAULT", "duet reset", "wrist_pitch", "quit")
        lines = screen.splitlines()
        headline = next((i for i, line in enumerate(lines)
                         if line.startswith("follower: FAULT: bus: sync read: 6 motors: no "
                                            "reply within 50.0 ms (base_yaw,")), None)
        assert headline is not None, screen
        assert "next: check the robot (the reason above), then: duet reset" in screen, screen
        assert headline < next(i for i, line in enumerate(lines) if "loop rate" in line)
        mode = next(line for line in lines if line.startswith("mode"))
        assert "FAULT  bus: sync read: 6" in mode  # one row in the panel, not a dozen
        assert screen.count("no reply") == 1, screen  # the headline says it, once
        _fits(screen)
    finally:
        term.close()
        pub.kill()
        pub.wait()


@pytest.mark.parametrize(("reason", "summary"), [
    ("bus: sync read: no reply within 5.0 ms from elbow (id 3); CRC error from gripper (id 6)",
     "bus: sync read: elbow: no reply within 5.0 ms; gripper: CRC error"),
    # not per-motor clauses: as it is
    ("no MIT reply within 2 ms from a, b, c", "no MIT reply within 2 ms from a, b, c"),
    ("deadline-miss storm: 40 of the last 100 ticks late; and more",
     "deadline-miss storm: 40 of the last 100 ticks late; and more"),
])
def test_a_reason_is_summarised_only_where_it_repeats_per_motor(reason: str,
                                                                 summary: str) -> None:
    from runtime.observe.reasons import summarize

    assert summarize(reason) == summary


def test_status_json_and_exit_code(publisher: Path) -> None:
    # a sample of each comes in well under a second; the timeout is for a loaded machine
    out = _duet("status", "--run-dir", str(publisher), "--json", "--timeout", "15")
    assert out.returncode == 0, out.stderr
    sample = json.loads(out.stdout)
    assert sample["follower"]["mode"] == "TRACK"
    # arrays arrive unpacked: the publisher moves every joint to 0.2 + 0.1 sin(t) rad and
    # plans to hold it
    q, err = sample["follower"]["q"], sample["follower"]["tracking_error"]
    assert len(q) == len(err) == N_JOINTS and len(set(q)) == 1 and 0.1 <= q[0] <= 0.3
    assert all(isinstance(e, float) and abs(e) < 0.2 for e in err)
    latency = sample["planner"]["latency_ms"]  # the planner shell's own figures
    assert 0 < latency["p50"] <= latency["p99"]
    # a live screen has no JSON: `duet top --json` is one sample, as status gives it
    top = _duet("top", "--run-dir", str(publisher), "--json", "--timeout", "15")
    assert top.returncode == 0 and json.loads(top.stdout)["follower"]["mode"] == "TRACK"
    text = _duet("status", "--run-dir", str(publisher), "--timeout", "15")
    assert "TRACK" in text.stdout and "planning" in text.stdout


def test_status_without_processes_fails_fast(tmp_path: Path) -> None:
    """No process: exit 1 saying so after its --timeout, never a hang (the 60 s limit of
    _duet; no tighter bound: the interpreter's start alone took 20 s on a loaded host)."""
    out = _duet("status", "--run-dir", str(tmp_path), "--timeout", "0.5")
    assert out.returncode == 1
    assert "no telemetry" in out.stdout


def test_camera_age_shows_each_cameras_value() -> None:
    """It printed "camera age - ms" while the JSON had {"scene": 41.2}."""
    from rich.console import Console

    from runtime.observe.telemetry_view import planner_table

    console = Console(width=80, record=True)
    console.print(planner_table({"source": "planner", "status": "planning",  # type: ignore[typeddict-item]
                                 "camera_age_ms": {"scene": 41.2, "wrist": None}}, None))
    text = console.export_text()
    assert "scene 41.2 ms, wrist - ms" in text, text


@pytest.mark.parametrize(("sample", "where", "in_doctor", "step", "never"), [
    # a deadline storm is the CPU's doing: not "check the robot"
    ({"follower": {"mode": "FAULT", "health": {"problems": [
        "FAULT: deadline-miss storm: 40 of the last 100 ticks"]}}, "planner": {
        "status": "idle"}}, "robot", False, "duet doctor (CPU contention", "check the robot"),
    ({"follower": {"mode": "FAULT", "health": {"problems": ["FAULT: elbow: overload"]}},
      "planner": {"status": "idle"}}, "robot", False, "check the robot", "duet doctor"),
    # a planner without joint state: the follower is the one to look at, not the cameras
    ({"follower": {"mode": "HOLD", "health": {"problems": []}}, "planner": {
        "status": "no_state"}}, "workstation", False, "no joint state from the follower",
     "cameras"),
    # doctor never advises doctor
    ({"follower": {"mode": "HOLD", "health": {"problems": [
        "12.0% of ticks missed their deadline"]}}, "planner": {"status": "idle"}},
     "robot", True, "see the checks above", "duet doctor"),
    # a workstation has no units to ask systemctl about
    ({"planner": {"status": "idle"}}, "workstation", False, "duet run", "systemctl"),
    ({"planner": {"status": "idle"}}, "robot", False, "systemctl status duet-follower",
     "duet run"),
])
def test_each_next_step_fits_the_cause_and_the_setting(
        sample: dict[str, object], where: str, in_doctor: bool, step: str, never: str) -> None:
    from runtime.observe.status import diagnosis

    found = diagnosis(sample, where, in_doctor)
    assert len(found) == 1, found
    assert step in found[0][1] and never not in found[0][1], found
