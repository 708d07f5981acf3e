"""`duet view`: the robot live in Foxglove. A Foxglove WebSocket server (foxglove-sdk) bound to
127.0.0.1 by default (reach it with `ssh -L 8765:localhost:8765 robot`), publishing the same
channels and schemas as the flight recorder's MCAP files (runtime/observe/channels.py), so a
layout made on a recording works live and the other way round."""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import foxglove
import zmq

from runtime.ipc.signals import stop_on_signals
from runtime.observe.channels import ChannelSubscriber, WallClock, schemas, to_record

log = logging.getLogger("duet.view")


class LiveView:
    def __init__(self, run_dir: str, host: str = "127.0.0.1", port: int = 8765,
                 frame_hz: float = 5.0, joints: list[str] | None = None) -> None:
        self.context = foxglove.Context()
        self.server = foxglove.start_server(name="duet", host=host, port=port,
                                            context=self.context)
        self.port = self.server.port
        self.channels = {
            topic: foxglove.Channel(topic, schema=foxglove.Schema(
                name=name, encoding="jsonschema", data=json.dumps(schema).encode()),
                message_encoding="json", context=self.context,
                metadata={"joints": ",".join(joints or [])})
            for topic, (name, schema) in schemas(list(joints or [])).items()}
        self.frame_period_ns = int(1e9 / frame_hz) if frame_hz > 0 else 0
        self.last_frame_ns = 0
        self.wall = WallClock()
        self.subs = ChannelSubscriber(run_dir, rcvhwm=2000)
        self.poller = zmq.Poller()
        self.subs.register(self.poller)
        self.sent = 0
        self.stop_requested = False

    def handle(self, topic: str, msg: dict[str, Any]) -> None:
        channel = self.channels[topic]
        if not channel.has_sinks():
            return  # nobody subscribed to it: skip the JSON work
        if topic == "/sim/frame":
            now = time.monotonic_ns()
            if now - self.last_frame_ns < self.frame_period_ns:
                return  # images are big: a viewer over SSH wants a few per second
            self.last_frame_ns = now
        rec = to_record(topic, msg, self.wall)
        channel.log(rec.data, log_time=rec.log_time_ns)
        self.sent += 1

    def poll_once(self, timeout_ms: int = 100) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            self.subs.drain(sock, self.handle)

    def close(self) -> None:
        self.subs.close()
        self.server.stop()


def serve_view(run_dir: str, host: str, port: int, frame_hz: float,
               duration_s: float | None, joints: list[str] | None = None) -> int:
    view = LiveView(run_dir, host, port, frame_hz, joints)

    stop_on_signals(view)
    print(f"Foxglove live view on ws://{host}:{view.port} (run dir {run_dir}); from your "
          f"machine: ssh -L {view.port}:localhost:{view.port} THIS-ROBOT, then open "
          f"ws://localhost:{view.port} in Foxglove. Ctrl-C stops.", flush=True)
    end = None if duration_s is None else time.monotonic() + duration_s
    try:
        while not view.stop_requested and (end is None or time.monotonic() < end):
            view.poll_once()
    finally:
        log.info("sent=%d rejected=%s", view.sent, dict(view.subs.rejected))
        view.close()
    return 0
