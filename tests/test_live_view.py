"""`duet view`: a real Foxglove WebSocket server process fed by a real publisher over ipc; a
WebSocket client (the Foxglove protocol) subscribes and receives every channel."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import websockets
from sim_arm import JOINTS

from runtime.observe.channels import schemas

pytestmark = pytest.mark.system  # a `duet view` process and a publisher process

REPO = Path(__file__).resolve().parents[1]
PUBLISHER = Path(__file__).with_name("test_deploy_publisher.py")


async def _receive_each_channel(port: int, timeout_s: float) -> tuple[dict[int, dict], set[str]]:
    async with websockets.connect(f"ws://127.0.0.1:{port}",
                                  subprotocols=["foxglove.sdk.v1"]) as ws:  # type: ignore[list-item]
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
                        {"id": cid, "channelId": cid} for cid in new]}))
            elif msg[0] == 0x01:  # message data: op, subscription id, timestamp, payload
                sub_id = int.from_bytes(msg[1:5], "little")
                payload = json.loads(msg[13:])
                assert "timestamp" in payload and "t_mono_ns" in payload
                got.add(channels[sub_id]["topic"])
        return channels, got


def test_view_serves_every_recorder_channel(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    pub = subprocess.Popen([sys.executable, str(PUBLISHER), str(run_dir), "--duration", "40"],
                           stdout=subprocess.PIPE, cwd=REPO)
    view = subprocess.Popen([sys.executable, "-m", "runtime.cli", "view", "--run-dir",
                             str(run_dir), "--port", "0", "--frame-hz", "20",
                             "--config", str(REPO / "configs/sim.yaml")],
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert pub.stdout is not None and view.stdout is not None
        assert pub.stdout.readline() == b"publishing\n"
        line = view.stdout.readline()
        found = re.search(r"ws://127\.0\.0\.1:(\d+)", line)  # localhost only by default
        assert found, line
        channels, got = asyncio.run(_receive_each_channel(int(found.group(1)), 20.0))
    finally:
        for proc in (view, pub):
            proc.terminate()
            proc.wait(timeout=10)
    expected = schemas(JOINTS)  # the joints of the config the view was started with
    assert {c["topic"] for c in channels.values()} == set(expected)
    for c in channels.values():  # the recordings' schemas, byte for byte
        name, schema = expected[c["topic"]]
        assert c["schemaName"] == name and json.loads(c["schema"]) == schema
    assert got == set(expected)
