"""sd_notify for the duet services: READY, WATCHDOG, STATUS, STOPPING.

No-op when not started by systemd (no NOTIFY_SOCKET). `watchdog()` is cheap enough to call
from the loop: it sends only when half the watchdog interval has elapsed, one preencoded
datagram, non-blocking, and never raises (a full socket buffer just skips a ping).
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        addr = env.get("NOTIFY_SOCKET", "")
        self._sock: socket.socket | None = None
        if addr:
            if addr.startswith("@"):  # abstract namespace
                addr = "\0" + addr[1:]
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            sock.connect(addr)
            self._sock = sock
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        # systemd sets WATCHDOG_PID when the watchdog is meant for one process only.
        mine = not pid or pid == str(os.getpid())
        self.watchdog_interval_s: float | None = (
            int(usec) / 1e6 if usec.isdigit() and int(usec) > 0 and mine else None
        )
        self._next_ping_ns = 0
        self._ping = b"WATCHDOG=1"

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> bool:
        """Send `KEY=VALUE` lines; True when systemd got them."""
        if self._sock is None:
            return False
        try:
            self._sock.send("\n".join(fields).encode())
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text}")

    def stopping(self) -> bool:
        return self.send("STOPPING=1")

    def watchdog(self, now_ns: int | None = None) -> bool:
        """Ping the watchdog at twice its rate; call as often as you like."""
        if self._sock is None or self.watchdog_interval_s is None:
            return False
        now = time.monotonic_ns() if now_ns is None else now_ns
        if now < self._next_ping_ns:
            return False
        self._next_ping_ns = now + int(self.watchdog_interval_s * 0.5e9)
        try:
            self._sock.send(self._ping)
        except OSError:
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
