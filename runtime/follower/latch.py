"""The latch: a FAULT/ESTOP survives a restart of the follower process (watchdog, crash) and,
with a state dir, a reboot; only an explicit reset clears it.

It is written twice: in the run dir, which survives a restart (made by tmpfiles, not by the
unit) and a reboot clears, where `duet estop` and `duet doctor` find it
without reading a config; and in the state dir (`state_dir`, /var/lib/duet/state on a robot),
which a reboot keeps, so a robot that faulted comes back latched."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("duet.follower")


class Latch:
    def __init__(self, run_dir_file: Path, state_file: Path | None = None) -> None:
        self.paths = [run_dir_file] + ([state_file] if state_file not in (None, run_dir_file)
                                       else [])

    def read(self) -> str | None:
        """Why the follower was latched before this start (after a reboot: from the state
        dir), or None."""
        for path in reversed(self.paths):
            try:
                text = path.read_text()[:500].strip()
            except (OSError, UnicodeDecodeError):
                continue
            if text:
                return text
        return None

    def write(self, mode: str, reason: str | None) -> None:
        for path in self.paths:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(f"{mode}: {reason}\n")
            except OSError as exc:  # a read-only dir must not turn a fault into a crash
                log.error("cannot write the latch file %s: %s", path, exc)

    def clear(self) -> None:
        for path in self.paths:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                log.error("cannot clear the latch file %s: %s", path, exc)
