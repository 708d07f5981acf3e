"""Every ZeroMQ socket duet opens is made here, with its message cap (ZMQ_MAXMSGSIZE), so a
socket without one cannot be written: libzmq refuses a bigger message from its length header,
before a byte of it is buffered, and drops that connection.

The caps are in runtime/ipc/endpoints.py beside the sockets they guard. What a dropped
connection means differs by side: a peer of a bound socket just reconnects (its next message
fits or it is dropped again), while a connecting socket's session ends for good (libzmq does
not redial after a protocol error), so the caps of connecting sockets sit well above
anything their bound peer sends, and the relay, the one connecting socket whose peer is not a
duet process on this host, redials by itself (runtime/remote/relay.py). tests/test_sockets.py
lists every call site and checks each cap on the live sockets.
"""

from __future__ import annotations

import zmq


def open_socket(ctx: zmq.Context[zmq.Socket[bytes]], kind: int, max_bytes: int
                ) -> zmq.Socket[bytes]:
    """A socket of `kind` that refuses any message over `max_bytes`."""
    if max_bytes <= 0:
        raise ValueError(f"a message cap must be positive, not {max_bytes}")
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.MAXMSGSIZE, max_bytes)
    return sock
