"""`duet view`: a real Foxglove WebSocket server process fed by a real publisher over ipc.
WebSocket clients (the Foxglove protocol) with and without the token, from a browser page
and from another local user: only who has the token (and, in a browser, an allowed Origin)
receives the robot's channels; every refusal is counted by reason."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import websockets
from sim_arm import JOINTS
from websockets.exceptions import InvalidStatus

from runtime.observe.channels import schemas

pytestmark = pytest.mark.system  # a `duet view` process and a publisher process

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = Path(__file__).with_name("test_deploy_publisher.py")
APP = "https://app.foxglove.dev"


@pytest.fixture
def robot(tmp_path: Path) -> Iterator[Path]:
    run_dir = tmp_path / "run"
    pub = subprocess.Popen([sys.executable, str(PUBLISHER), str(run_dir), "--duration", "60"],
                           stdout=subprocess.PIPE, cwd=REPO)
    try:
        assert pub.stdout is not None
        assert pub.stdout.readline() == b"publishing\n"
        yield run_dir
    finally:
        pub.terminate()
        pub.wait(timeout=10)


def _start_view(run_dir: Path) -> tuple[subprocess.Popen[str], dict]:
    view = subprocess.Popen([sys.executable, "-m", "runtime.cli", "view", "--run-dir",
                             str(run_dir), "--port", "0", "--frame-hz", "20", "--json",
                             "--config", str(REPO / "configs/sim.yaml")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert view.stdout is not None
    return view, json.loads(view.stdout.readline())


def _stop_view(view: subprocess.Popen[str]) -> str:
    view.terminate()
    _, err = view.communicate(timeout=20)
    assert view.returncode == 0, err
    return err


async def _receive_each_channel(url: str, subprotocol: str, timeout_s: float,
                                origin: str | None = None) -> tuple[dict[int, dict], set[str]]:
    async with websockets.connect(url, subprotocols=[subprotocol],  # type: ignore[list-item]
                                  origin=origin) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == subprotocol
        channels: dict[int, dict] = {}
        got: set[str] = set()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and (not channels or got != {
                c["topic"] for c in channels.values()}):
            try:
                msg = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            if isinstance(msg, str):
                body = json.loads(msg)
                if body.get("op") == "advertise":
                    new = {c["id"]: c for c in body["channels"]}
                    channels.update(new)
                    await ws.send(json.dumps({"op": "subscribe", "subscriptions": [
                        {"id": cid + 100, "channelId": cid} for cid in new]}))
            elif msg[0] == 0x01:  # message data: op, subscription id, timestamp, payload
                sub_id = int.from_bytes(msg[1:5], "little")
                payload = json.loads(msg[13:])
                assert "timestamp" in payload and "t_mono_ns" in payload
                got.add(channels[sub_id - 100]["topic"])
        return channels, got


async def _refusal(url: str, subprotocols: list[str] | None, origin: str | None) -> int:
    """The HTTP status a refused upgrade gets (0: it was admitted)."""
    try:
        async with websockets.connect(url, subprotocols=subprotocols,  # type: ignore[arg-type]
                                      origin=origin):  # type: ignore[arg-type]
            return 0
    except InvalidStatus as exc:
        return exc.response.status_code


def test_only_a_client_with_the_token_and_an_allowed_origin_reads_the_robot(
        robot: Path) -> None:
    view, info = _start_view(robot)
    try:
        url, token, port = info["url"], info["token"], info["port"]
        assert url == f"ws://localhost:{port}/?token={token}" and info["host"] == "127.0.0.1"
        assert len(token) >= 32 and token not in " ".join(view.args)  # type: ignore[arg-type]
        bare = f"ws://127.0.0.1:{port}/"
        wrong = f"{bare}?token={'x' * len(token)}"
        sdk = ["foxglove.sdk.v1"]
        cases = {  # (url, subprotocols, Origin) -> HTTP status
            "no token": (bare, sdk, None, 401),
            "wrong token": (wrong, sdk, None, 401),
            "another page, no token": (bare, sdk, "https://evil.example", 403),
            "another page with the token": (url, sdk, "https://evil.example", 403),
            "a local file with the token": (url, sdk, "null", 403),
            "no Foxglove subprotocol": (url, ["chat"], None, 400),
            "the Foxglove app": (url, sdk, APP, 0),
        }
        got = {name: asyncio.run(_refusal(u, p, o)) for name, (u, p, o, _) in cases.items()}
        assert got == {name: case[3] for name, case in cases.items()}
        # who has the token reads every channel, over either subprotocol
        expected = schemas(JOINTS)  # the joints of the config the view was started with
        for subprotocol, origin in (("foxglove.sdk.v1", APP), ("foxglove.websocket.v1", None)):
            channels, received = asyncio.run(_receive_each_channel(url, subprotocol, 30.0,
                                                                   origin))
            assert {c["topic"] for c in channels.values()} == set(expected)
            for c in channels.values():  # the recordings' schemas, byte for byte
                name, schema = expected[c["topic"]]
                assert c["schemaName"] == name and json.loads(c["schema"]) == schema
            # /shadow/telemetry speaks only while a shadow planner runs (none here)
            assert received == set(expected) - {"/shadow/telemetry"}, subprotocol
    finally:
        err = _stop_view(view)
    counts = re.search(r"refused: (.*?);", err)
    assert counts, err
    assert counts.group(1) == "origin=3 subprotocol=1 token=2", err


NOBODY = """
import asyncio, json, os, sys
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus  # imports first: nobody may not read them
pid, port, token = sys.argv[1], sys.argv[2], sys.argv[3]
os.setgroups([]); os.setgid(65534); os.setuid(65534)
print("cmdline", token in open(f"/proc/{pid}/cmdline").read().replace("\\0", " "))
try:
    open(f"/proc/{pid}/environ").read()
    print("environ readable")
except PermissionError:
    print("environ denied")
async def connect(url):
    try:
        async with ws_connect(url, subprotocols=["foxglove.sdk.v1"]) as ws:
            return "admitted " + json.loads(await ws.recv())["op"]
    except InvalidStatus as exc:
        return f"refused {exc.response.status_code}"
print("without", asyncio.run(connect(f"ws://127.0.0.1:{port}/")))
print("guessed", asyncio.run(connect(f"ws://127.0.0.1:{port}/?token=duet")))
print("with", asyncio.run(connect(f"ws://127.0.0.1:{port}/?token={token}")))
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="switches to another uid")
def test_another_local_user_cannot_read_the_view(robot: Path) -> None:
    """TCP on 127.0.0.1 has no file permissions: another user (nobody) reaches the port but
    not the robot; the token is not in the view's argv and its environ is not readable, so
    the only way in is the token printed to the terminal that started the view."""
    assert pwd.getpwuid(65534).pw_name == "nobody"
    view, info = _start_view(robot)
    try:
        done = subprocess.run([sys.executable, "-c", NOBODY, str(view.pid), str(info["port"]),
                               info["token"]], capture_output=True, text=True, timeout=60,
                              cwd=REPO)
    finally:
        err = _stop_view(view)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "cmdline False", "environ denied", "without refused 401", "guessed refused 401",
        'with admitted serverInfo']
    assert re.search(r"refused: token=2;", err), err
