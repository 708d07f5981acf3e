"""Client side of the follower's control socket (estop, reset, status, set, get)."""

from __future__ import annotations

from typing import Any

import zmq

from runtime import endpoints
from runtime.messages import Encoder, MessageError, decode


class ControlError(Exception):
    pass


def request(run_dir: str, cmd: str, args: dict[str, Any] | None = None,
            timeout_s: float = 2.0, endpoint: str | None = None) -> dict[str, Any]:
    """Send one request; return the reply body ({ok, error, result}); ControlError if none.

    `endpoint` defaults to the follower's control socket in `run_dir`."""
    endpoint = endpoint or endpoints.control(run_dir)
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.REQ)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVTIMEO, int(timeout_s * 1000))
    sock.setsockopt(zmq.SNDTIMEO, int(timeout_s * 1000))
    try:
        sock.connect(endpoint)
        sock.send(Encoder().encode("request", {"cmd": cmd, "args": args or {}}))
        reply = decode(sock.recv(), "reply")
    except zmq.Again:
        raise ControlError(f"no reply from {endpoint} within {timeout_s:g} s "
                           "(is it running?)") from None
    except MessageError as exc:
        raise ControlError(f"bad reply: {exc}") from None
    finally:
        sock.close()
    return {"ok": bool(reply.get("ok")), "error": reply.get("error"),
            "result": reply.get("result") or {}}
