"""sd_notify for the duet processes: READY, STATUS, WATCHDOG, STOPPING.

The socket is made non-blocking: a notification must never stall the follower's loop when
the receiver (systemd, or the `duet run` supervisor) is slow to drain it; a full socket
drops the message, which the watchdog tolerates (it is sent many times per WatchdogSec).
"""

from __future__ import annotations

import sdnotify


def notifier() -> sdnotify.SystemdNotifier:
    n = sdnotify.SystemdNotifier()
    if n.socket is not None:
        n.socket.setblocking(False)
    return n
