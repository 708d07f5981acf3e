"""Client side of duet's REQ/REP sockets: the follower's control socket (estop, reset,
status, set, get), the recorder's, and the sim's fault-injection socket."""

from __future__ import annotations

from typing import Any

import zmq

from runtime import endpoints
from runtime.messages import Encoder, MessageError, decode


class ControlError(Exception):
    pass


def request_at(endpoint: str, cmd: str, args: dict[str, Any] | None = None,
               timeout_s: float = 2.0) -> dict[str, Any]:
    """One request; the reply body {ok, error, result}; ControlError when none comes."""
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        sock.send(Encoder().encode("request", {"cmd": cmd, "args": args or {}}))
        if not sock.poll(int(timeout_s * 1000)):
            raise ControlError(f"no reply from {endpoint} within {timeout_s:g} s "
                               "(is it running?)")
        try:
            reply = decode(sock.recv(), "reply")
        except MessageError as exc:
            raise ControlError(f"bad reply from {endpoint}: {exc}") from None
    finally:
        sock.close()
    return {"ok": bool(reply.get("ok")), "error": reply.get("error"),
            "result": reply.get("result") or {}}


def request(run_dir: str, cmd: str, args: dict[str, Any] | None = None,
            timeout_s: float = 2.0) -> dict[str, Any]:
    """A request to the follower's control socket in `run_dir`."""
    return request_at(endpoints.control(run_dir), cmd, args, timeout_s)
