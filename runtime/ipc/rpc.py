"""duet's one request/reply server, and its client.

A request is {"cmd": str, "args": {...}} (message type `request`), a reply {"ok", "error",
"result"} (type `reply`). The server is a ROUTER socket so a reply may be deferred (a `reset`
that reopens the bus answers when it is done) while other requests, an `estop` above all,
are still served. Every request is handled inside one try: a malformed frame, a forged role,
a handler that raises, or a result that does not encode all become an error reply and a
counted reason; nothing a client sends leaves this module as an exception.

Used by the follower (control), the planner (task), the recorder and the sim's fault socket.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from runtime.ipc import endpoints
from runtime.ipc.access import ADMIN, OPERATOR
from runtime.ipc.messages import Encoder, MessageError, decode
from runtime.ipc.sockets import open_socket

log = logging.getLogger("duet.rpc")

Result = dict[str, Any]


class RequestError(Exception):
    """A refused request: the text is the reply's error."""


class Deferred:
    """Returned by a handler that answers later with `ReplyServer.complete(token, ...)`."""

    __slots__ = ("token",)

    def __init__(self) -> None:
        self.token: list[bytes] = []


@dataclass(frozen=True)
class Command:
    handler: Callable[[dict[str, Any]], Result | Deferred]
    role: str = ADMIN  # the least role allowed: OPERATOR < ADMIN
    help: str = ""
    # what, in these args or the process's state now, needs an admin though `role` does not
    # (e.g. a reset out of FAULT); None: `role` suffices
    admin_if: Callable[[dict[str, Any]], str | None] | None = None


_RANK = {OPERATOR: 1, ADMIN: 2}


class ReplyServer:
    def __init__(self, sock: zmq.Socket[bytes], commands: dict[str, Command],
                 authenticated: bool = False) -> None:
        """`sock`: a bound ROUTER. With `authenticated`, the role comes from the ZAP
        handler's User-Id (runtime/ipc/access.py); without, every peer is admin (a socket that
        only its own process or a test reaches)."""
        self.sock = sock
        self.commands = commands
        self.authenticated = authenticated
        self.dropped: Counter[str] = Counter()
        self.served = 0
        self._enc = Encoder()

    def serve_pending(self, limit: int = 8) -> int:
        """Handle up to `limit` waiting requests without blocking; returns how many."""
        handled = 0
        while handled < limit:
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            handled += 1
            self._serve_one(frames)
        return handled

    def _serve_one(self, frames: list[zmq.Frame]) -> None:
        # REQ peers send [identity, b"", body]; anything else cannot be answered.
        if len(frames) != 3 or frames[1].bytes != b"":
            self.dropped["envelope"] += 1
            return
        route = [frames[0].bytes, b""]
        try:
            role = str(frames[2].get("User-Id")) if self.authenticated else ADMIN
            reply = self._handle(frames[2].bytes, role)
        except Exception as exc:  # a handler bug must not take the server down
            self.dropped["handler"] += 1
            log.error("request handler failed: %r", exc)
            reply = {"ok": False, "error": f"internal error: {exc.__class__.__name__}",
                     "result": {}}
        if isinstance(reply, Deferred):
            reply.token = route
            return
        self._send(route, reply)

    def _handle(self, body: bytes, role: str | None) -> dict[str, Any] | Deferred:
        try:
            req = decode(body, "request")
        except MessageError as exc:
            self.dropped[exc.kind] += 1
            return _error(f"bad request: {exc}")
        cmd, args = req.get("cmd"), req.get("args", {})
        command = self.commands.get(cmd) if type(cmd) is str else None
        if command is None:
            self.dropped["unknown"] += 1
            known = ", ".join(sorted(self.commands))
            return _error(f"unknown command {cmd!r} (known: {known})")
        if not isinstance(args, dict):
            self.dropped["schema"] += 1
            return _error(f"{cmd}: args must be a map, got {type(args).__name__}")
        if _RANK.get(role or "", 0) < _RANK[command.role]:
            self.dropped["permission"] += 1
            return _error(f"{cmd}: permission denied (needs {command.role}; "
                          f"you are {role or 'nobody'}): try with sudo")
        why = command.admin_if(args) if command.admin_if is not None else None
        if why is not None and _RANK.get(role or "", 0) < _RANK[ADMIN]:
            self.dropped["permission"] += 1
            return _error(f"{cmd}: permission denied ({why} needs {ADMIN}; "
                          f"you are {role or 'nobody'}): try with sudo")
        try:
            result = command.handler(args)
        except RequestError as exc:
            return _error(str(exc))
        self.served += 1
        return result if isinstance(result, Deferred) else {"ok": True, "error": None,
                                                             "result": result}

    def complete(self, deferred: Deferred, ok: bool, error: str | None, result: Result) -> None:
        """Answer a deferred request."""
        if deferred.token:
            self._send(deferred.token, {"ok": ok, "error": error, "result": result})
            deferred.token = []

    def _send(self, route: list[bytes], reply: dict[str, Any]) -> None:
        try:
            body = self._enc.encode("reply", reply)
        except Exception as exc:  # an unencodable result is a server bug, reported as such
            self.dropped["encode"] += 1
            body = self._enc.encode("reply", _error(f"reply not encodable: {exc}"))
        try:
            self.sock.send_multipart([*route, body], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.dropped["unsent"] += 1  # the client went away


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text, "result": {}}


def bind_server(ctx: zmq.Context[zmq.Socket[bytes]], endpoint: str, commands: dict[str, Command],
                zap_domain: str | None = None) -> ReplyServer:
    """A ROUTER bound at `endpoint` with the request size cap, wrapped in a ReplyServer."""
    sock = open_socket(ctx, zmq.ROUTER, endpoints.MAX_REQUEST_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 64)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client raises, not hangs
    if zap_domain is not None:
        sock.setsockopt(zmq.ZAP_DOMAIN, zap_domain.encode())
        sock.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)
    sock.bind(endpoint)
    return ReplyServer(sock, commands, authenticated=zap_domain is not None)


# ---------------------------------------------------------------------------- client
class ControlError(Exception):
    """No (valid) reply: the server is not running, not reachable, or refused us."""


def request_at(endpoint: str, cmd: str, args: dict[str, Any] | None = None,
               timeout_s: float = 2.0) -> dict[str, Any]:
    """One request; the reply body {ok, error, result}; ControlError when none comes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = open_socket(ctx, zmq.REQ, endpoints.MAX_REPLY_BYTES)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(Encoder().encode("request", {"cmd": cmd, "args": args or {}}))
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(f"no reply from {endpoint} within {timeout_s:g} s "
                               "(not running, or access refused)")
        try:
            reply = decode(sock.recv(), "reply")
        except MessageError as exc:
            raise ControlError(f"bad reply from {endpoint}: {exc}") from None
    finally:
        sock.close()
    result = reply.get("result")
    return {"ok": reply.get("ok") is True, "error": reply.get("error"),
            "result": result if isinstance(result, dict) else {}}
