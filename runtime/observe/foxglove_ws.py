"""The server side of the Foxglove WebSocket protocol, as much as `duet view` needs: serverInfo,
advertise, subscribe / unsubscribe, message data. Nothing a client sends reaches the robot.
Its own server because foxglove-sdk's (0.30) has no hook to see a client's request: no token,
no Origin check was possible with it.

Who may connect (checked in the HTTP upgrade, before a byte of robot data is sent; each
refusal counted by reason):
- `origin`: a browser names the page that opened the socket in `Origin`; only the allowed
  origins (the Foxglove app) pass, so a web page reached through the SSH tunnel cannot read
  the robot. Clients that are not browsers send no Origin and pass this check.
- `token`: the URL's `?token=` must equal the view's token (compared in constant time). The
  token is made when the view starts and printed only to the terminal that started it, so
  another local user (TCP on 127.0.0.1 has no file permissions) cannot read the robot.
- `subprotocol`: the client must offer `foxglove.sdk.v1` (today's Foxglove app and SDK) or
  `foxglove.websocket.v1` (the ws-protocol spec, e.g. Lichtblick); the messages used here are
  the same in both.
- `busy`: at most MAX_CLIENTS at a time.

Threads: the server runs its own asyncio loop in a thread; `publish` is called from the
caller's thread and hands the frame over with call_soon_threadsafe. A slow client loses its
oldest frames (counted in `dropped`), never stalls the caller or the other clients.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger("duet.view")

SUBPROTOCOLS = ("foxglove.sdk.v1", "foxglove.websocket.v1")  # preferred first
FOXGLOVE_APP = "https://app.foxglove.dev"
MAX_CLIENTS = 8
MAX_CLIENT_MESSAGE_BYTES = 64 * 1024  # subscribe/unsubscribe are a few hundred bytes
MAX_SUBSCRIPTIONS = 256  # per client
BACKLOG = 256  # frames queued per client before the oldest is dropped
_MESSAGE_DATA = 0x01  # binary opcode: u32 subscription id, u64 log time ns, payload (LE)


def _json(body: dict[str, Any]) -> str:
    return json.dumps(body, separators=(",", ":"))


@dataclass(frozen=True)
class Channel:
    id: int
    topic: str
    schema_name: str
    schema: str  # JSON schema text
    metadata: dict[str, str] = field(default_factory=dict)

    def advertised(self) -> dict[str, Any]:
        return {"id": self.id, "topic": self.topic, "encoding": "json",
                "schemaName": self.schema_name, "schemaEncoding": "jsonschema",
                "schema": self.schema, "metadata": self.metadata}


class Gate:
    """The upgrade request's checks, in order: Origin, token, subprotocol."""

    def __init__(self, token: str, origins: Iterable[str]) -> None:
        self.token = token.encode()
        self.origins = frozenset(origins)

    def reason(self, path: str, headers: Headers) -> tuple[str, int, str] | None:
        """None to admit, else (reason, HTTP status, the text the client gets)."""
        origin = headers.get("Origin")
        if origin is not None and origin not in self.origins:
            return "origin", 403, (f"origin {origin} may not open duet view (allowed: "
                                   f"{', '.join(sorted(self.origins)) or 'none'})")
        given = parse_qs(urlsplit(path).query).get("token", [""])[-1].encode()
        if not hmac.compare_digest(given, self.token):  # same answer for missing and wrong
            return "token", 401, "duet view needs its token: ws://HOST:PORT/?token=TOKEN " \
                                 "as printed by duet view"
        offered = {p.strip() for h in headers.get_all("Sec-WebSocket-Protocol")
                   for p in h.split(",")}
        if not offered & set(SUBPROTOCOLS):
            return "subprotocol", 400, (f"duet view speaks {' or '.join(SUBPROTOCOLS)}; "
                                        f"offered: {', '.join(sorted(offered)) or 'none'}")
        return None


@dataclass(eq=False)
class _Client:
    ws: ServerConnection
    queue: asyncio.Queue[bytes]
    subscriptions: dict[int, int] = field(default_factory=dict)  # subscription id -> channel


class FoxgloveServer:
    def __init__(self, name: str, channels: list[Channel], gate: Gate, host: str,
                 port: int) -> None:
        self.name = name
        self.channels = {c.id: c for c in channels}
        self.gate = gate
        self.refused: Counter[str] = Counter()
        self.ignored: Counter[str] = Counter()  # client messages that were not understood
        self.dropped = 0  # frames a slow client did not get
        self.subscribed: frozenset[int] = frozenset()  # channel ids someone wants
        self._clients: set[_Client] = set()
        self._session = str(time.time_ns())
        self._last_refusal_log = 0.0
        # its INFO lines (each connection, each refusal) would repeat ours, unthrottled
        logging.getLogger("websockets").setLevel(logging.WARNING)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="foxglove-ws",
                                        daemon=True)
        self._thread.start()
        self._server: Server = asyncio.run_coroutine_threadsafe(
            self._start(host, port), self._loop).result(timeout=10)
        self.port: int = self._server.sockets[0].getsockname()[1]

    async def _start(self, host: str, port: int) -> Server:
        return await serve(self._serve, host, port, process_request=self._admit,
                           subprotocols=list(SUBPROTOCOLS),  # type: ignore[arg-type]
                           max_size=MAX_CLIENT_MESSAGE_BYTES, compression=None)

    # ------------------------------------------------------------------ the caller's thread
    def publish(self, channel_id: int, log_time_ns: int, payload: bytes) -> None:
        self._loop.call_soon_threadsafe(self._fan_out, channel_id, log_time_ns, payload)

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()
        asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the server's loop
    def _admit(self, connection: ServerConnection, request: Request) -> Response | None:
        if len(self._clients) >= MAX_CLIENTS:
            refusal: tuple[str, int, str] | None = ("busy", 503, "duet view has "
                                                    f"{MAX_CLIENTS} clients already")
        else:
            refusal = self.gate.reason(request.path, request.headers)
        if refusal is None:
            return None
        reason, status, text = refusal
        self.refused[reason] += 1
        now = time.monotonic()
        if now - self._last_refusal_log >= 1.0:  # a flood of attempts cannot flood the log
            self._last_refusal_log = now
            log.warning("refused a client (%s): %s; refused so far: %s", reason, text,
                        " ".join(f"{k}={v}" for k, v in sorted(self.refused.items())))
        return connection.respond(status, text + "\n")

    async def _serve(self, ws: ServerConnection) -> None:
        client = _Client(ws, asyncio.Queue(BACKLOG))
        self._clients.add(client)
        writer = asyncio.create_task(self._write(client))
        try:
            await ws.send(_json({"op": "serverInfo", "name": self.name, "capabilities": [],
                                 "metadata": {}, "sessionId": self._session}))
            await ws.send(_json({"op": "advertise", "channels": [
                c.advertised() for c in self.channels.values()]}))
            async for message in ws:
                self._on_message(client, message)
        except ConnectionClosed:
            pass
        finally:
            writer.cancel()
            self._clients.discard(client)
            self._resubscribe()

    async def _write(self, client: _Client) -> None:
        try:
            while True:
                await client.ws.send(await client.queue.get())
        except ConnectionClosed:
            pass

    def _on_message(self, client: _Client, message: str | bytes) -> None:
        """subscribe / unsubscribe; anything else is counted and ignored (this server offers
        no capability a client could use to send data)."""
        try:
            body: Any = json.loads(message) if isinstance(message, str) else None
            op = body.get("op") if isinstance(body, dict) else None
            if op == "subscribe":
                for sub in body["subscriptions"]:
                    sub_id, channel_id = int(sub["id"]), int(sub["channelId"])
                    if not 0 <= sub_id < 2**32:  # it goes on the wire as a u32
                        raise ValueError(f"subscription id {sub_id}")
                    if channel_id not in self.channels:
                        raise ValueError(f"no channel {channel_id}")
                    if len(client.subscriptions) >= MAX_SUBSCRIPTIONS:
                        raise ValueError("too many subscriptions")
                    client.subscriptions[sub_id] = channel_id
            elif op == "unsubscribe":
                for sub_id in body["subscriptionIds"]:
                    client.subscriptions.pop(int(sub_id), None)
            else:
                self.ignored[str(op) if isinstance(op, str) else "not json"] += 1
                return
        except (ValueError, KeyError, TypeError) as exc:
            self.ignored[type(exc).__name__] += 1
            return
        self._resubscribe()

    def _resubscribe(self) -> None:
        self.subscribed = frozenset(ch for c in self._clients for ch in
                                    c.subscriptions.values())

    def _fan_out(self, channel_id: int, log_time_ns: int, payload: bytes) -> None:
        for client in self._clients:
            for sub_id, ch in client.subscriptions.items():
                if ch != channel_id:
                    continue
                if client.queue.full():
                    client.queue.get_nowait()
                    self.dropped += 1
                client.queue.put_nowait(struct.pack("<BIQ", _MESSAGE_DATA, sub_id,
                                                    log_time_ns) + payload)
