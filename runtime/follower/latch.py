"""The latch: a FAULT/ESTOP survives a restart of the follower process (watchdog, crash); only
an explicit reset clears it. The file lives in the run dir, which systemd preserves across
restarts (RuntimeDirectoryPreserve) and a reboot clears."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("duet.follower")


class Latch:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> str | None:
        """Why the follower was latched before this start, or None."""
        try:
            return self.path.read_text()[:500].strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    def write(self, mode: str, reason: str | None) -> None:
        try:
            self.path.write_text(f"{mode}: {reason}\n")
        except OSError as exc:  # a read-only run dir must not turn a fault into a crash
            log.error("cannot write the latch file %s: %s", self.path, exc)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
