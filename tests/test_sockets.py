"""Every socket duet opens has a message cap (ZMQ_MAXMSGSIZE), and a planner server cannot crash
the robot's relay (issue 21, item 2).

Three views of the same claim: the source, where every ZeroMQ socket is made through
runtime/ipc/sockets.py (the list of call sites and their caps is printed); a live stack, where
every socket bound in the run dir drops the connection of a peer that sends one byte over its
cap; and a live relay facing a hostile planner server (a 1-waypoint plan, dt_s = 0, a 300 MB
frame): it survives, counts each, and takes the next good plan.
"""

from __future__ import annotations

import ast
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
import zmq.utils.monitor
from onnx_bundle import make_bundle
from stack import REPO, Stack

from bench.remote_robots import Keys, make_keys
from runtime.ipc import endpoints, keys
from runtime.ipc.messages import Encoder, decode
from runtime.observe.subscriber import TelemetrySubscriber
from runtime.remote.wire import encode_plan

CODE = ("runtime", "drivers", "sim")
HELPER = "runtime/ipc/sockets.py"


def _socket_calls() -> Iterator[tuple[str, int, ast.Call]]:
    """(file, line, call) of every `<something>.socket(...)` (ZeroMQ's constructor; the stdlib
    `socket.socket` excepted) and every `open_socket(...)` in the code duet ships."""
    for folder in CODE:
        for path in sorted((REPO / folder).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if not isinstance(node, ast.Call):
                    continue
                f = node.func
                stdlib = isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) \
                    and f.value.id == "socket"
                if (isinstance(f, ast.Attribute) and f.attr == "socket" and not stdlib) or \
                        (isinstance(f, ast.Name) and f.id == "open_socket"):
                    yield str(path.relative_to(REPO)), node.lineno, node


def test_every_zmq_socket_in_the_code_is_opened_with_a_cap(capsys: pytest.CaptureFixture[str]
                                                           ) -> None:
    raw, capped = [], []
    for file, line, call in _socket_calls():
        if isinstance(call.func, ast.Name):
            kind, cap = (ast.unparse(a) for a in call.args[1:3])
            capped.append(f"{file}:{line}  {kind}  {cap}")
        elif file != HELPER:
            raw.append((file, line))
    # drivers import none of the runtime: the sim camera sets the cap the runtime hands it
    camera = (REPO / "drivers/camera.py").read_text()
    assert [f for f, _ in raw] == ["drivers/camera.py"], raw
    assert "setsockopt(zmq.MAXMSGSIZE, max_bytes)" in camera
    assert "max_bytes=endpoints.MAX_SIM_BYTES" in (REPO / "runtime/planner/cameras.py"
                                                  ).read_text()
    assert len(capped) >= 15
    assert all(cap.split()[-1] not in ("0", "-1") for cap in capped)
    with capsys.disabled():
        print("\nsockets duet opens (file:line, type, cap):\n  " + "\n  ".join(capped))


def _oversize_is_dropped(endpoint: str, kind: int, frame: bytes) -> bool:
    """Connect a `kind` socket, send `frame`; True when the bound side drops the connection."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    mon = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
    try:
        sock.connect(endpoint)
        events: list[int] = []
        deadline = time.monotonic() + 10.0
        while zmq.EVENT_HANDSHAKE_SUCCEEDED not in events and time.monotonic() < deadline:
            if mon.poll(100):
                events.append(zmq.utils.monitor.recv_monitor_message(mon)["event"])
        assert zmq.EVENT_HANDSHAKE_SUCCEEDED in events, f"{endpoint}: not admitted"
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            # a PUB drops what it sends before the peer's subscription arrives: send again
            if kind == zmq.PUB or time.monotonic() + 5.0 - deadline < 0.1:
                sock.send(frame, zmq.NOBLOCK)
            if mon.poll(100) and zmq.utils.monitor.recv_monitor_message(mon)["event"] \
                    == zmq.EVENT_DISCONNECTED:
                return True
        return False
    finally:
        sock.close(linger=0)
        mon.close(linger=0)


# what a peer of each bound socket is, and what it can send: a PUB only reads subscriptions
BOUND = {
    "plan": (zmq.PUB, endpoints.MAX_PLAN_BYTES),
    "control": (zmq.DEALER, endpoints.MAX_REQUEST_BYTES),
    "task": (zmq.DEALER, endpoints.MAX_REQUEST_BYTES),
    "recorder": (zmq.DEALER, endpoints.MAX_REQUEST_BYTES),
    "sim-control": (zmq.DEALER, endpoints.MAX_REQUEST_BYTES),
    "state": (zmq.XSUB, endpoints.MAX_SUBSCRIPTION_BYTES),
    "telemetry-follower": (zmq.XSUB, endpoints.MAX_SUBSCRIPTION_BYTES),
    "telemetry-planner": (zmq.XSUB, endpoints.MAX_SUBSCRIPTION_BYTES),
    "sim": (zmq.XSUB, endpoints.MAX_SUBSCRIPTION_BYTES),
    "shadow": (zmq.XSUB, endpoints.MAX_SUBSCRIPTION_BYTES),  # the planner's XPUB
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("bundle"))


@pytest.mark.system
def test_every_socket_a_live_stack_binds_drops_a_message_over_its_cap(
        tmp_path: Path, bundle: Path) -> None:
    """Sim, follower, planner and recorder as on a robot; every socket in the run dir gets one
    byte more than its cap from a peer of the right type, and drops that connection (without
    a cap a PUB would take a 1 KiB+ subscription, a ROUTER the request), and every process
    goes on."""
    with Stack(tmp_path, bundle, record=True) as stack:
        run = Path(stack.run_dir)
        deadline = time.monotonic() + 30.0
        while not (run / "recorder").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        found = {p.name for p in run.iterdir() if p.is_socket()} - {endpoints.NOTIFY_SOCKET}
        assert found == set(BOUND), "a socket in the run dir that this test does not know"
        kept = []
        for name, (kind, cap) in BOUND.items():
            frame = (b"\x01" if kind == zmq.XSUB else b"") + b"x" * cap
            frame = frame + b"x" if kind != zmq.XSUB else frame  # one byte over the cap
            if not _oversize_is_dropped(f"ipc://{run / name}", kind, frame):
                kept.append(name)
        assert kept == [], f"sockets that took a message over their cap: {kept}"
        assert all(p.poll() is None for p in stack.sup.children.values())
        assert stack.control("status")["ok"]


# ------------------------------------------------------------------ a hostile planner server
@pytest.fixture
def remote_keys(tmp_path: Path) -> Keys:
    return make_keys(tmp_path / "keys", ["robot-0"])


def _planner_remote(tel: TelemetrySubscriber, timeout_s: float, until: Any) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    remote: dict[str, Any] = {}
    while time.monotonic() < deadline:
        tel.poll(0.2)
        latest = tel.latest.get("planner")
        if latest is not None and "remote" in latest:
            remote = {**latest["remote"], "plans": latest["plans"]}
            if until(remote):
                return remote
    raise AssertionError(f"planner telemetry never showed it: {remote}")


@pytest.mark.system
def test_a_hostile_planner_server_cannot_crash_the_relay(tmp_path: Path,
                                                          remote_keys: Keys) -> None:
    """Over CURVE, the server answers the robot's observations with a 1-waypoint plan, a plan
    with dt_s = 0 and a 300 MB frame: the relay (the robot's planner process) drops and counts
    each, never publishes them, redials after the cut, and takes the next good plan."""
    ctx = zmq.Context.instance()
    fake = ctx.socket(zmq.ROUTER)
    fake.setsockopt(zmq.LINGER, 0)
    pair = keys.load_pair(remote_keys.server_secret)
    fake.curve_server, fake.curve_secretkey, fake.curve_publickey = True, pair.secret, pair.public
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    sets = [f"planner.remote.endpoint=tcp://127.0.0.1:{port}",
            f"planner.remote.server_key={remote_keys.server_public}",
            f"planner.remote.robot_key={remote_keys.robots['robot-0']}"]
    enc = Encoder()

    def observation() -> tuple[bytes, dict[str, Any]]:
        assert fake.poll(60000), "no observation from the robot"
        route, body = fake.recv_multipart()
        return route, decode(body)

    tel = TelemetrySubscriber(tmp_path / "run", ("planner",))
    try:
        with Stack(tmp_path, REPO / "bundles/reference", sets) as stack:
            planner = stack.sup.children["planner"]
            route, obs = observation()
            n = 6
            one = np.zeros((1, n), np.float32)
            fake.send_multipart([route, encode_plan(enc, one, 0.1, obs["t_obs_ns"], None,
                                                    obs["seq"], 1.0)])
            route, obs = observation()
            ten = np.zeros((10, n), np.float32)
            fake.send_multipart([route, encode_plan(enc, ten, 0.0, obs["t_obs_ns"], None,
                                                    obs["seq"], 1.0)])
            remote = _planner_remote(tel, 20, lambda r: r["dropped"].get("dt", 0) >= 1)
            assert remote["dropped"].get("shape") == 1 and remote["plans"] == 0, remote
            # one byte over the relay's cap: libzmq cuts the session and would never redial
            route, obs = observation()
            fake.send_multipart([route, bytes(endpoints.MAX_PLAN_BYTES + 1)])
            remote = _planner_remote(tel, 30, lambda r: r["dropped"].get("cut", 0) >= 1
                                     and r["connected"])
            # 300 MB: encrypting it stalls this fake's heartbeats, so the link may drop on
            # its heartbeat timeout before the frame's header arrives; either way, none of
            # it is buffered and the relay is back
            disconnects = remote["disconnects"]
            route, obs = observation()
            fake.send_multipart([route, bytes(300 << 20)], copy=False)
            _planner_remote(tel, 180, lambda r: r["disconnects"] > disconnects
                            and r["connected"])
            assert planner.poll() is None, "the relay died"
            # redialled: the next good plan is taken and published
            deadline = time.monotonic() + 20
            while tel.latest["planner"]["plans"] < 1 and time.monotonic() < deadline:
                route, obs = observation()
                fake.send_multipart([route, encode_plan(enc, ten, 0.1, obs["t_obs_ns"], None,
                                                        obs["seq"], 1.0)])
                tel.poll(0.5)
            remote = _planner_remote(tel, 10, lambda r: r["plans"] >= 1)
            assert planner.poll() is None
            assert remote["dropped"]["shape"] == 1 and remote["dropped"]["dt"] == 1
            assert remote["dropped"]["cut"] >= 1
    finally:
        tel.close()
        fake.close(linger=0)
