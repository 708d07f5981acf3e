"""sd_notify for the duet processes: READY, STATUS, WATCHDOG, STOPPING.

The protocol of sd_notify(3): one datagram of `KEY=VALUE` lines to the AF_UNIX socket named
by $NOTIFY_SOCKET (a leading '@' means Linux's abstract namespace). Written here rather
than taken from `sdnotify`, which publishes no wheel (the robot installs wheels only) and
whose socket blocks.

The socket is non-blocking: a notification must never stall the follower's loop when the
receiver (systemd, or the `duet run` supervisor) is slow to drain it; a full socket drops
the message, which the watchdog tolerates (it is sent many times per WatchdogSec).
"""

from __future__ import annotations

import os
import socket


class Notifier:
    """Sends to $NOTIFY_SOCKET (or `address`); does nothing when there is none."""

    def __init__(self, address: str | None = None) -> None:
        address = os.environ.get("NOTIFY_SOCKET", "") if address is None else address
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self.socket: socket.socket | None = None
        if self.address:
            self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self.socket.setblocking(False)

    def notify(self, state: str) -> bool:
        """Send `state` (e.g. "READY=1"); False when not sent (no socket, full, gone)."""
        if self.socket is None:
            return False
        try:
            self.socket.sendto(state.encode(), self.address)
        except OSError:
            return False
        return True


def notifier() -> Notifier:
    return Notifier()
