"""Client side of the ipc sockets: telemetry samples (status, top) and REQ/REP requests
(requests go through runtime.ipc.rpc)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import zmq

from runtime.ipc import endpoints
from runtime.ipc.messages import MessageError, decode
from runtime.ipc.sockets import open_socket

SOURCES = ("follower", "planner")


class TelemetrySubscriber:
    """SUB on the follower's and planner's telemetry sockets; keeps the newest of each."""

    def __init__(self, run_dir: str | Path, sources: tuple[str, ...] = SOURCES) -> None:
        self._ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self._poller = zmq.Poller()
        self._socks: dict[zmq.Socket[bytes], str] = {}
        for source in sources:
            sock = open_socket(self._ctx, zmq.SUB, endpoints.MAX_TELEMETRY_BYTES)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.setsockopt(zmq.RCVHWM, 10)
            # connect works before the publisher binds; zmq reconnects when it appears
            sock.connect(endpoints.telemetry(str(run_dir), source))
            self._poller.register(sock, zmq.POLLIN)
            self._socks[sock] = source
        self.latest: dict[str, dict[str, Any]] = {}
        self.received_at: dict[str, float] = {}
        self.rejected = 0

    def poll(self, timeout_s: float) -> int:
        """Drain what is waiting (waiting up to `timeout_s` for the first); returns count."""
        n = 0
        for sock, _ in self._poller.poll(int(timeout_s * 1000)):
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = decode(frame, "telemetry")
                except MessageError:
                    self.rejected += 1
                    continue
                source = self._socks[sock]
                self.latest[source] = msg
                self.received_at[source] = time.monotonic()
                n += 1
        return n

    def sample(self, timeout_s: float) -> dict[str, dict[str, Any]]:
        """Wait until every source has sent one message, or the timeout; newest of each."""
        deadline = time.monotonic() + timeout_s
        wanted = set(self._socks.values())
        while not wanted <= set(self.latest):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.poll(left)
        return dict(self.latest)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
        self._socks.clear()
