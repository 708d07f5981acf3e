"""Issue 9's findings against a running stack, each a regression test: hostile control
requests, forged and oversize traffic from other local users, a second stack on the same
run dir, the estop fallbacks, and faults that must announce themselves."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from onnx_bundle import make_bundle
from sim_arm import JOINTS, sim_config
from stack import REPO, Stack, stop_and_cont

from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, decode, pack_array
from runtime.ipc.rpc import request_at

pytestmark = pytest.mark.system

NOBODY = pwd.getpwnam("nobody")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switches to another uid")


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


def _raw_request(endpoint: str, body: bytes, timeout_s: float = 2.0) -> dict[str, object]:
    sock = zmq.Context.instance().socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(body)
        assert sock.poll(int(timeout_s * 1000)), "no reply"
        return decode(sock.recv(), "reply")
    finally:
        sock.close()


def test_hostile_control_requests_get_error_replies_and_the_follower_lives(
        tmp_path: Path, bundle: Path) -> None:
    with Stack(tmp_path, bundle, planner=False) as stack:
        ep = endpoints.control(stack.run_dir)
        enc = Encoder()
        hostile = [
            msgpack.packb({"v": 1, "type": [], "seq": 1, "t_ns": 1}),  # killed it before
            enc.encode("request", {"cmd": "estop", "args": [1, 2]}),  # non-dict args
            enc.encode("request", {"cmd": "set", "args": "follower.hz"}),
            enc.encode("request", {"cmd": ["status"], "args": {}}),
            enc.encode("request", {"cmd": "set", "args": {"key": {}, "value": 1}}),
            b"\x00" * 64,
        ]
        for body in hostile:
            reply = _raw_request(ep, body)
            assert reply["ok"] is False and reply["error"], body
        assert stack.control("status")["ok"]
        assert stack.telemetry()["mode"] == "HOLD"
        # a 300 MB request is cut at the socket (ZMQ_MAXMSGSIZE): no reply, no growth
        rss_before = stack.control("status")["result"]
        sock = zmq.Context.instance().socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ep)
        sock.send(b"\x00" * (300 << 20))
        assert not sock.poll(1500)
        sock.close()
        status = stack.control("status")
        assert status["ok"] and status["result"]["mode"] == "HOLD"
        assert status["result"]["ticks"] > rss_before["ticks"]
        rss_kb = int(Path(f"/proc/{stack.pid('follower')}/status").read_text()
                     .split("VmRSS:")[1].split()[0])
        assert rss_kb < 600 * 1024, rss_kb  # the 300 MB never arrived
        # the software e-stop still works after all of it
        assert stack.control("estop")["ok"]
        stack.wait_mode("ESTOP", 1)


def _as_nobody(code: str, run_dir: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a child that dropped to uid nobody (another local user). What it needs
    is imported first: the interpreter's own files are not readable by nobody here."""
    pre = ("import os, sys, time, json, numpy, zmq; from runtime.ipc import endpoints; "
           "from runtime.ipc.messages import Encoder, pack_array; "
           "from runtime.ipc.rpc import request_at, ControlError; os.setgroups([]); "
           f"os.setgid({NOBODY.pw_gid}); os.setuid({NOBODY.pw_uid}); ")
    return subprocess.run([sys.executable, "-c", pre + code, run_dir], cwd=REPO,
                          capture_output=True, text=True, timeout=30)


_FORGE = """
import sys, time, numpy as np, zmq
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, pack_array
run_dir = sys.argv[1]
pub = zmq.Context.instance().socket(zmq.PUB)
pub.connect(endpoints.plan(run_dir))
enc = Encoder()
w = np.zeros((10, 6), np.float32); w[:, 0] = 0.9  # steer base_yaw
for _ in range(40):
    pub.send(enc.encode("plan", {"waypoints": pack_array(w), "dt_s": 0.1,
                                 "t_obs_ns": time.monotonic_ns(), "latency_ms": 1.0}))
    time.sleep(0.02)
bind = zmq.Context.instance().socket(zmq.PUB)
try:
    bind.bind(endpoints.plan(run_dir))
    print("BOUND")
except zmq.ZMQError as exc:
    print("BIND REFUSED", exc)
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A folder every local user can traverse (pytest's tmp_path is under a 0700 one), so
    the run dir's own mode and the follower's checks are what a test exercises."""
    path = Path(tempfile.mkdtemp(prefix="duet-access-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@needs_root
def test_another_local_user_cannot_steer_or_take_the_plan_endpoint(
        open_dir: Path, bundle: Path) -> None:
    run_dir = open_dir / "run"
    with Stack(open_dir, bundle, planner=False) as stack:
        assert (run_dir.stat().st_mode & 0o777) == 0o750
        out = _as_nobody(_FORGE, str(run_dir))
        assert "BIND REFUSED" in out.stdout  # 0750: others cannot even reach the sockets
        # Let the attacker reach the socket, so what stops its plans is the follower's own
        # check of its peer credentials.
        os.chmod(run_dir, 0o755)
        os.chmod(run_dir / "plan", 0o777)
        q0 = stack.q()
        out = _as_nobody(_FORGE, str(run_dir))
        assert out.returncode == 0, out.stderr
        tel = stack.telemetry()
        assert tel["mode"] == "HOLD" and tel["plans"] == 0
        assert tel["dropped_messages"].get("access_plan", 0) >= 1
        assert abs(stack.q()[0] - q0[0]) < 0.01
        assert "BIND REFUSED" in out.stdout  # it cannot take the endpoint over either


_AS_OPERATOR = ("import sys, json; from runtime.ipc import endpoints; "
                "from runtime.ipc.rpc import request_at; ep = endpoints.control(sys.argv[1]); "
                "print(json.dumps([request_at(ep, c, a, 10.0) for c, a in {}]))")


@needs_root
def test_operators_may_estop_and_reset_out_of_estop_but_not_out_of_fault_nor_set(
        open_dir: Path, bundle: Path) -> None:
    """Who may leave which latch (issue 21 item 9): an operator stops the arm and resets out
    of that ESTOP (what `duet estop` tells them); a FAULT has a cause to fix, so its reset and
    `duet reboot` stay admin, as do `set` and `get`."""
    with Stack(open_dir, bundle, ["access.operator_group=nogroup"], planner=False) as stack:
        os.chmod(stack.run_dir, 0o755)
        os.chmod(Path(stack.run_dir) / "control", 0o777)
        code = _AS_OPERATOR.format("[('status', {}), ('set', {'key': 'follower.blend_ms', "
                                   "'value': 10}), ('estop', {}), ('reset', {})]")
        out = _as_nobody(code, stack.run_dir)  # nobody's group is nogroup: an operator
        assert out.returncode == 0, out.stderr
        status, set_, estop, reset = json.loads(out.stdout)
        assert status["ok"]
        assert not set_["ok"] and "permission denied" in set_["error"]
        assert estop["ok"]
        assert reset["ok"] and reset["result"]["mode"] == "HOLD", reset
        stack.wait_mode("HOLD", 10)
        stack.sim_fault("silence", joint=2, on=True)
        stack.wait_mode("FAULT", 10)
        stack.sim_fault("silence", joint=2, on=False)
        out = _as_nobody(_AS_OPERATOR.format("[('reset', {}), ('reset', {'reboot': ['elbow']})]"),
                         stack.run_dir)
        reset, reboot = json.loads(out.stdout)
        assert not reset["ok"] and "a reset out of FAULT needs admin" in reset["error"]
        assert "try with sudo" in reset["error"]
        assert not reboot["ok"] and "rebooting a motor needs admin" in reboot["error"]
        assert stack.telemetry()["mode"] == "FAULT"
        assert stack.control("reset")["ok"]  # the follower's own user: admin
        stack.wait_mode("HOLD", 10)
    (open_dir / "2").mkdir()
    (open_dir / "2").chmod(0o755)
    with Stack(open_dir / "2", bundle, ["access.operator_group=root"], planner=False) as stack:
        os.chmod(stack.run_dir, 0o755)
        os.chmod(Path(stack.run_dir) / "control", 0o777)
        out = _as_nobody("import sys; from runtime.ipc import endpoints; "
                         "from runtime.ipc.rpc import request_at, ControlError\ntry:\n "
                         "request_at(endpoints.control(sys.argv[1]), 'estop', {}, 1.5)\n"
                         "except ControlError:\n "
                         "print('REFUSED')", stack.run_dir)
        assert "REFUSED" in out.stdout  # not in the operator group: not even an estop
        assert stack.telemetry()["mode"] == "HOLD"
        assert stack.telemetry()["dropped_messages"].get("access_control", 0) >= 1


def test_a_second_stack_on_the_same_run_dir_refuses_naming_the_pid(
        tmp_path: Path, bundle: Path) -> None:
    with Stack(tmp_path, bundle, planner=False) as stack:
        run = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "run", "--config",
             str(REPO / "configs/sim.yaml"), "--set", f"run_dir={stack.run_dir}",
             "--set", f"bundle.path={bundle}", "--duration", "2"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert run.returncode == 2
        assert f"pid {os.getpid()}" in run.stderr  # the first `duet run` (this test) holds it
        follower = subprocess.run(
            [sys.executable, "-m", "runtime.cli", "follower", "--config",
             str(REPO / "configs/sim.yaml"), "--set", f"run_dir={stack.run_dir}",
             "--set", f"bundle.path={bundle}", "--set", "bus.device=/dev/null"],
            cwd=REPO, capture_output=True, text=True, timeout=60)
        assert follower.returncode == 2
        assert f"pid {stack.pid('follower')}" in follower.stderr
        assert stack.control("status")["ok"]  # the first follower still answers


def _duet(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


def test_estop_uses_the_run_dir_never_yaml_and_falls_back_to_a_signal(
        tmp_path: Path, bundle: Path) -> None:
    with Stack(tmp_path, bundle, planner=False) as stack:
        # no /etc/duet here: the run dir comes from $DUET_RUN_DIR alone
        out = _duet("estop", env={"DUET_RUN_DIR": stack.run_dir})
        assert out.returncode == 0 and "ESTOP" in out.stdout, out.stderr
        stack.wait_mode("ESTOP", 1)
        assert _duet("reset", "--run-dir", stack.run_dir).returncode == 0
        stack.wait_mode("HOLD", 2)
        # the control socket gone (unlinked): SIGUSR1 to the pid in the lock file
        (Path(stack.run_dir) / "control").unlink()
        out = _duet("estop", "--run-dir", stack.run_dir)
        assert out.returncode == 0 and "by signal" in out.stdout, out.stderr
        stack.wait_mode("ESTOP", 1)


def test_estop_with_nothing_to_stop_says_not_stopped(tmp_path: Path) -> None:
    out = _duet("estop", "--run-dir", str(tmp_path))
    assert out.returncode == 1 and "NOT STOPPED" in out.stderr


def test_a_run_that_ends_in_fault_exits_non_zero_with_the_fault_first(
        tmp_path: Path, bundle: Path) -> None:
    """The sim's home pose is outside these limits: the follower faults at start."""
    summary = tmp_path / "s.json"
    position_max = sim_config().robot.limits.position_max
    position_max[JOINTS.index("elbow")] = 0.5  # the sim's home elbow (1.82 rad) lies above it
    out = _duet("run", "--config", str(REPO / "configs/sim.yaml"),
                "--set", f"run_dir={tmp_path / 'run'}", "--set", f"bundle.path={bundle}",
                "--set", f"robot.limits.position_max={position_max}",
                "--set", "robot.limits.state_margin=0.0",
                "--duration", "3", "--summary-json", str(summary))
    assert out.returncode == 1, out.stderr[-2000:]
    s = json.loads(summary.read_text())
    assert next(iter(s)) == "outcome"
    assert s["outcome"]["final_mode"] == "FAULT" and "elbow" in s["outcome"]["reason"]
    assert s["exit_codes"]["follower"] == 3
    assert out.stdout.index("follower ended in FAULT") < out.stdout.index("duet run")
    assert "level=error" in out.stderr and "After fixing the cause: duet reset" in out.stderr


def test_status_is_unhealthy_past_the_configured_thresholds(tmp_path: Path,
                                                            bundle: Path) -> None:
    with Stack(tmp_path, bundle, ["follower.health.min_rate_ratio=1.0",
                                  "follower.health.max_miss_ratio=0.0"], planner=False) as stack:
        # a quiet host keeps 500 Hz exactly: a 0.1 s stall inside the window is what must show
        stop_and_cont(stack, "follower", 0.1)
        time.sleep(0.3)
        health = stack.control("status")["result"]["health"]
        assert not health["ok"] and health["problems"]
        assert any("Hz" in p or "missed" in p for p in health["problems"])
    # the verdict follows the thresholds, not this (shared, noisy) machine's timing
    with Stack(tmp_path / "ok", bundle, ["follower.health.min_rate_ratio=0.0",
                                         "follower.health.max_miss_ratio=1.0"],
               planner=False) as stack:
        time.sleep(1.5)
        health = stack.control("status")["result"]["health"]
        assert health["ok"], health
        stack.control("estop")
        health = stack.control("status")["result"]["health"]
        assert not health["ok"] and health["problems"][0].startswith("ESTOP")


def test_task_set_refused_cleared_and_idle_is_healthy(tmp_path: Path, bundle: Path) -> None:
    with Stack(tmp_path, bundle, ["planner.task_source=operator"]) as stack:
        ep = endpoints.task(stack.run_dir)
        deadline = time.monotonic() + 15
        while request_at(ep, "status", {}, 5.0)["result"]["status"] != "idle":
            assert time.monotonic() < deadline, "planner never idle (inputs fine, no task)"
            time.sleep(0.2)
        bad = request_at(ep, "task", {"instruction": "fetch the purple unicorn"})
        assert not bad["ok"] and "'fetch'" in bad["error"] and "'unicorn'" in bad["error"]
        out = _duet("task", "touch the red block", "--episode", "7", "--run-dir", stack.run_dir)
        assert out.returncode == 0 and "touch the red block" in out.stdout, out.stderr
        stack.wait_mode("TRACK", 5)
        assert json.loads((Path(stack.run_dir) / "task.json").read_text())["episode"] == 7
        assert _duet("task", "--clear", "--run-dir", stack.run_dir).returncode == 0
        stack.wait_mode("HOLD", 2)
        assert request_at(ep, "status", {})["result"]["status"] == "idle"


def test_a_planner_cannot_plan_from_an_old_observation(tmp_path: Path, bundle: Path) -> None:
    """Replayed / delayed plans older than the plan timeout are refused and counted."""
    with Stack(tmp_path, bundle, planner=False) as stack:
        pub = zmq.Context.instance().socket(zmq.PUB)
        pub.connect(endpoints.plan(stack.run_dir))
        time.sleep(0.3)
        q0 = stack.q()
        w = np.tile(q0, (10, 1)).astype(np.float32)
        w[:, 0] += 0.3
        enc = Encoder()
        old = time.monotonic_ns() - 2_000_000_000
        for dt in (5e-324, 0.1):
            for _ in range(5):
                pub.send(enc.encode("plan", {"waypoints": pack_array(w), "dt_s": dt,
                                             "t_obs_ns": old if dt == 0.1 else
                                             time.monotonic_ns(), "latency_ms": 1.0}))
                time.sleep(0.02)
        time.sleep(0.2)
        tel = stack.telemetry()
        assert tel["mode"] == "HOLD" and tel["safety"]["faults"] == 0
        assert tel["dropped_messages"]["stale"] >= 5 and tel["dropped_messages"]["dt"] >= 5
        pub.close(linger=0)


def test_an_estop_during_a_reset_wins(tmp_path: Path, bundle: Path) -> None:
    """A reset reopening a dead bus runs on a worker while the loop keeps its deadlines; an
    estop arriving meanwhile must not be undone when the reset completes. (The estop is sent
    once a second reset is refused as "already running": an estop that came first would be
    cleared by the reset, as a reset after an estop must.)"""
    with Stack(tmp_path, bundle, planner=False) as stack:
        ctx = zmq.Context.instance()
        for _attempt in range(5):
            stack.sim_fault("cut_line")
            stack.wait_mode("FAULT", 3)
            stack.sim_fault("restore_line")
            reset = ctx.socket(zmq.REQ)
            reset.setsockopt(zmq.LINGER, 0)
            reset.connect(endpoints.control(stack.run_dir))
            reset.send(Encoder().encode("request", {"cmd": "reset", "args": {}}))
            while True:  # until the reset is seen running, or has already ended
                probe = stack.control("reset")
                running = "already running" in str(probe.get("error"))
                if running or probe["ok"]:
                    break
            if running:
                assert stack.control("estop")["ok"]  # lands during (or right after) the reset
            assert reset.poll(10_000)
            reset.recv()
            reset.close()
            if running:
                break
        else:
            pytest.fail("the reset never ran long enough to be seen running")
        time.sleep(0.3)
        tel = stack.telemetry()
        assert tel["mode"] == "ESTOP" and not tel["torque_on"], tel["mode"]
        assert (Path(stack.run_dir) / "follower.latched").read_text().startswith("ESTOP")
