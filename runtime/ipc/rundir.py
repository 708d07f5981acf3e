"""The run dir: one stack per directory, enforced with flock, and its access mode.

The follower holds `follower.lock` and `duet run` holds `run.lock` for their lifetimes (the
kernel drops an flock when its holder dies, so a crash never leaves a stale lock). Each lock
file holds its owner's pid: `duet estop` signals that pid when the control socket is silent.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

RUN_DIR_MODE = 0o750  # owner rwx, group duet may reach the sockets, others nothing
UMASK = 0o007  # sockets and files group-accessible (operators), never world


class LockHeld(Exception):
    """Another live process holds this run dir's lock; the message names its pid."""

    def __init__(self, path: Path, pid: int | None) -> None:
        who = f"pid {pid}" if pid else "another process"
        super().__init__(f"{path.parent} is in use by {who} ({path.name} is locked): "
                         "stop it first, or use another run dir")
        self.pid = pid


def prepare(run_dir: str | Path) -> Path:
    """Create the run dir (0750) if needed and set the process umask for what it creates."""
    path = Path(run_dir)
    os.umask(UMASK)
    path.mkdir(parents=True, exist_ok=True, mode=RUN_DIR_MODE)
    return path


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


class RunLock:
    """An exclusive flock on `run_dir/name` for this process's lifetime."""

    def __init__(self, run_dir: str | Path, name: str) -> None:
        self.path = Path(run_dir) / name
        self._fd = -1

    def acquire(self) -> RunLock:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise LockHeld(self.path, read_pid(self.path)) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = -1


def holder(run_dir: str | Path, name: str) -> tuple[bool, int | None]:
    """(held, pid): whether a live process holds `name` in `run_dir`, and its pid if the
    file says (a positive pid only: never hand 0 or -1 to os.kill)."""
    path = Path(run_dir) / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False, None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = read_pid(path)
        return True, pid if pid and pid > 0 else None
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False, None
    finally:
        os.close(fd)
