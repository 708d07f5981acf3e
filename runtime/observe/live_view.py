"""`duet view`: the robot live in Foxglove. A Foxglove WebSocket server (runtime/observe/
foxglove_ws.py) bound to 127.0.0.1 by default (reach it with `ssh -L 8765:localhost:8765
robot`), publishing the same channels and schemas as the flight recorder's MCAP files
(runtime/observe/channels.py), so a layout made on a recording works live and the other way
round. A client needs the token this process prints (and, in a browser, an allowed Origin)."""

from __future__ import annotations

import json
import logging
import secrets
import time
from typing import Any

import zmq

from runtime.ipc.logs import key_values
from runtime.ipc.signals import stop_on_signals
from runtime.observe.channels import ChannelSubscriber, WallClock, schemas, to_record
from runtime.observe.foxglove_ws import FOXGLOVE_APP, Channel, FoxgloveServer, Gate

log = logging.getLogger("duet.view")


class LiveView:
    def __init__(self, run_dir: str, host: str = "127.0.0.1", port: int = 8765,
                 frame_hz: float = 5.0, joints: list[str] | None = None,
                 origins: tuple[str, ...] = (FOXGLOVE_APP,)) -> None:
        self.token = secrets.token_urlsafe(24)  # never in argv, environ or a file
        metadata = {"joints": ",".join(joints or [])}
        self.channel_ids: dict[str, int] = {}
        channels = []
        for i, (topic, (name, schema)) in enumerate(schemas(list(joints or [])).items(), 1):
            self.channel_ids[topic] = i
            channels.append(Channel(i, topic, name, json.dumps(schema), metadata))
        self.server = FoxgloveServer("duet", channels, Gate(self.token, origins), host, port)
        self.port = self.server.port
        self.frame_period_ns = int(1e9 / frame_hz) if frame_hz > 0 else 0
        self.last_frame_ns = 0
        self.wall = WallClock()
        self.subs = ChannelSubscriber(run_dir, rcvhwm=2000)
        self.poller = zmq.Poller()
        self.subs.register(self.poller)
        self.sent = 0
        self.stop_requested = False

    def handle(self, topic: str, msg: dict[str, Any]) -> None:
        channel = self.channel_ids[topic]
        if channel not in self.server.subscribed:
            return  # nobody subscribed to it: skip the JSON work
        if topic == "/sim/frame":
            now = time.monotonic_ns()
            if now - self.last_frame_ns < self.frame_period_ns:
                return  # images are big: a viewer over SSH wants a few per second
            self.last_frame_ns = now
        rec = to_record(topic, msg, self.wall)
        self.server.publish(channel, rec.log_time_ns, rec.data)
        self.sent += 1

    def poll_once(self, timeout_ms: int = 100) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            self.subs.drain(sock, self.handle)

    def close(self) -> None:
        self.subs.close()
        self.server.close()


def serve_view(run_dir: str, host: str, port: int, frame_hz: float,
               duration_s: float | None, joints: list[str] | None = None,
               origins: tuple[str, ...] = (FOXGLOVE_APP,), as_json: bool = False) -> int:
    view = LiveView(run_dir, host, port, frame_hz, joints, origins)

    stop_on_signals(view)
    url = f"ws://localhost:{view.port}/?token={view.token}"
    tunnel = f"ssh -L {view.port}:localhost:{view.port} THIS-ROBOT"
    if as_json:  # one line, printed before serving: a script reads it and connects
        print(json.dumps({"url": url, "token": view.token, "host": host, "port": view.port,
                          "run_dir": run_dir, "tunnel": tunnel, "origins": list(origins)}),
              flush=True)
    else:
        print(f"Foxglove live view on {host}:{view.port} (run dir {run_dir}).\n"
              f"From your machine: {tunnel}\n"
              f"then in Foxglove, Open connection > Foxglove WebSocket: {url}\n"
              "The token is this run's password: share it only with who may watch the robot. "
              "Ctrl-C stops.", flush=True)
    end = None if duration_s is None else time.monotonic() + duration_s
    try:
        while not view.stop_requested and (end is None or time.monotonic() < end):
            view.poll_once()
    finally:
        view.close()
        log.info("sent=%d refused: %s; ignored from clients: %s; dropped for slow clients=%d; "
                 "rejected from the robot: %s", view.sent,
                 key_values(dict(sorted(view.server.refused.items()))),
                 key_values(view.server.ignored), view.server.dropped,
                 key_values(view.subs.rejected))
    return 0
