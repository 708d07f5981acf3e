"""The off-board planner on a bad network: the sim robot (sim, follower, relay as real
processes) reaches its planner server through a fault-injecting TCP proxy and a veth pair
between two network namespaces made for the test (the proxy listens on this host's loopback
and dials the server from the robot's namespace; the server runs in the other).

Faults, in order, on one running robot: latency spikes (below and above the plan timeout),
a stalled connection, a 5 s partition (the link down), a server restart. Throughout, every
follower telemetry sample is checked: the arm never tracks a plan older than its timeout.
After each fault the follower holds, tracking resumes when plans return, and the robot
reconnects by itself.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import netns
import pytest
import zmq
from onnx_bundle import make_bundle
from stack import REPO, Stack

from bench.remote_robots import Keys, PlannerServerProcess, make_keys
from runtime.ipc import endpoints
from runtime.ipc.messages import decode

WHY_NOT = netns.unavailable()
pytestmark = [pytest.mark.system,  # stacks and a planner server across network namespaces
              pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or "")]

SERVER_PORT = 5571  # inside the server's own namespace
# a busy shared host starves the follower for whole ticks: these tests are about the network,
# so it takes a much worse deadline-miss storm than configs/sim.yaml's to FAULT here
STORM_MISSES = 400  # of follower.deadline_storm.window_ticks (500)
TIMEOUT_MS = 400.0  # configs/sim.yaml follower.plan_timeout_ms


class Watch:
    """Every follower telemetry sample (20 Hz), on a thread: (time, mode, plan age ms,
    dropped, plans taken), and each one that tracked a plan older than the timeout."""

    def __init__(self, run_dir: str) -> None:
        self.samples: list[tuple[float, str, float | None, dict[str, int], int]] = []
        self.violations: list[tuple[float, str, float | None]] = []
        self._stop = threading.Event()
        self._sub = zmq.Context.instance().socket(zmq.SUB)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.connect(endpoints.telemetry(run_dir, "follower"))
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sub.poll(100):
                continue
            msg = decode(self._sub.recv())
            mode, age = str(msg["mode"]), msg.get("plan_age_ms")
            self.samples.append((time.monotonic(), mode, age, dict(msg["dropped_messages"]),
                                 int(msg["plans"])))
            # a tick's age and a sample's differ by the time between them: a few ms
            if mode == "TRACK" and (age is None or age > TIMEOUT_MS + 10):
                self.violations.append((time.monotonic(), mode, age))

    def wait_mode(self, mode: str, timeout_s: float) -> float:
        """Seconds until a sample reports `mode`."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout_s:
            if self.samples and self.samples[-1][0] > t0 and self.samples[-1][1] == mode:
                return time.monotonic() - t0
            time.sleep(0.02)
        last = self.samples[-1][1] if self.samples else "nothing"
        raise AssertionError(f"follower not in {mode} within {timeout_s} s (last: {last})")

    def modes_since(self, t0: float) -> list[str]:
        return [s[1] for s in self.samples if s[0] >= t0]

    def dropped(self) -> dict[str, int]:
        return self.samples[-1][3] if self.samples else {}

    def plans(self) -> int:
        return self.samples[-1][4] if self.samples else 0

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2.0)
        self._sub.close(linger=0)


class FaultProxy:
    def __init__(self, link: netns.VethLink, upstream: str) -> None:
        listener = socket.create_server(("127.0.0.1", 0))  # this host's loopback
        self.port = listener.getsockname()[1]
        self.proc = subprocess.Popen(
            [*link.exec_in(link.robot), sys.executable, str(REPO / "tests/fault_proxy.py"),
             "--listen-fd", str(listener.fileno()), "--upstream", upstream],
            pass_fds=[listener.fileno()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True)
        listener.close()
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ok"

    def __call__(self, command: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@dataclass
class Net:
    link: netns.VethLink
    keys: Keys
    bundle: Path
    server_dir: Path
    server: PlannerServerProcess
    proxy: FaultProxy
    stack: Stack
    watch: Watch

    def start_server(self) -> PlannerServerProcess:
        return PlannerServerProcess(
            self.server_dir, self.bundle, self.keys,
            listen=f"tcp://{netns.SERVER_IP}:{SERVER_PORT}",
            prefix=self.link.exec_in(self.link.server))

    def relay(self) -> dict[str, Any]:
        """The relay's own figures (its status socket)."""
        from runtime.ipc.rpc import request_at

        reply = request_at(endpoints.task(self.stack.run_dir), "status", timeout_s=5.0)
        assert reply["ok"], reply
        return dict(reply["result"])


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    netns.remove_leftovers()
    tmp = tmp_path_factory.mktemp("faults")
    bundle = make_bundle(tmp / "bundle")
    keys = make_keys(tmp / "keys", ["robot-0"])
    with netns.VethLink() as link:
        proxy: FaultProxy | None = None
        server: PlannerServerProcess | None = None
        try:
            server = PlannerServerProcess(
                tmp / "server", bundle, keys, listen=f"tcp://{netns.SERVER_IP}:{SERVER_PORT}",
                prefix=link.exec_in(link.server))
            proxy = FaultProxy(link, f"{netns.SERVER_IP}:{SERVER_PORT}")
            overrides = [f"follower.deadline_storm.misses={STORM_MISSES}",
                         f"planner.remote.endpoint=tcp://127.0.0.1:{proxy.port}",
                         f"planner.remote.server_key={keys.server_public}",
                         f"planner.remote.robot_key={keys.robots['robot-0']}"]
            with Stack(tmp / "robot", bundle, overrides) as stack:
                watch = Watch(stack.run_dir)
                n = Net(link, keys, bundle, tmp / "server", server, proxy, stack, watch)
                try:
                    watch.wait_mode("TRACK", 30.0)
                    yield n
                finally:
                    watch.close()
                    if n.server.proc.poll() is None:
                        n.server.stop()
        finally:
            if proxy is not None:
                proxy.close()
            if server is not None and server.proc.poll() is None:
                server.stop()


def _resumes(net: Net, since: float, timeout_s: float = 15.0) -> None:
    net.watch.wait_mode("TRACK", timeout_s)
    assert "HOLD" in net.watch.modes_since(since)
    assert net.watch.violations == [], net.watch.violations[:5]


def test_latency_spikes_track_below_the_timeout_and_hold_above_it(net: Net) -> None:
    # the newest plan's age swings between the round trip R and R + the 200 ms planner
    # period: 80 ms more R keeps it inside the 400 ms timeout with room for this busy host
    net.proxy("delay 40")
    t0 = time.monotonic()
    plans, stale_before = net.watch.plans(), net.watch.dropped().get("stale", 0)
    time.sleep(3.0)
    assert net.watch.plans() >= plans + 5  # taken: at most a few ms older with the spike
    # none stale (one tolerated: a descheduled relay on this shared host); above the timeout
    # below, every plan is
    assert net.watch.dropped().get("stale", 0) <= stale_before + 1
    assert "TRACK" in net.watch.modes_since(t0)
    stale_before = net.watch.dropped().get("stale", 0)
    net.proxy("delay 350")  # 700 ms: every plan arrives older than the 400 ms timeout
    t1 = time.monotonic()
    net.watch.wait_mode("HOLD", 3.0)
    time.sleep(3.0)
    assert net.watch.modes_since(t1 + 1.5).count("TRACK") == 0  # held the whole spike
    assert net.watch.dropped().get("stale", 0) > stale_before  # refused, counted
    net.proxy("pass")
    _resumes(net, t1)


def test_a_stalled_connection_holds_the_arm_and_the_robot_redials(net: Net) -> None:
    before = net.relay()["remote"]
    net.proxy("stall")
    t0 = time.monotonic()
    assert net.watch.wait_mode("HOLD", 2.0) <= TIMEOUT_MS / 1e3 + 0.6
    time.sleep(3.0)  # heartbeats time out: the relay drops the link, redials into the stall
    assert not net.relay()["remote"]["connected"]
    net.proxy("pass")
    _resumes(net, t0)
    after = net.relay()["remote"]
    assert after["connected"] and after["connects"] > before["connects"]


def test_a_5_s_partition_holds_the_arm_and_tracking_resumes(net: Net) -> None:
    before = net.relay()["remote"]
    net.link.set_up(False)
    t0 = time.monotonic()
    try:
        assert net.watch.wait_mode("HOLD", 2.0) <= TIMEOUT_MS / 1e3 + 0.6
        time.sleep(5.0 - (time.monotonic() - t0))
        assert net.watch.modes_since(t0 + 1.0).count("TRACK") == 0
    finally:
        net.link.set_up(True)
    _resumes(net, t0)
    assert net.relay()["remote"]["connects"] > before["connects"]


def test_a_server_restart_holds_the_arm_and_the_robot_reconnects(net: Net) -> None:
    before = net.relay()["remote"]
    net.server.proc.send_signal(signal.SIGTERM)
    assert net.server.proc.wait(15) == 0
    t0 = time.monotonic()
    net.watch.wait_mode("HOLD", 2.0)
    time.sleep(1.0)
    net.server = net.start_server()  # same address: the robot redials it unaided
    _resumes(net, t0, timeout_s=60.0)
    assert net.relay()["remote"]["connects"] > before["connects"]
    assert os.path.exists(net.server_dir / "planner-server-summary.json")
