"""`duet stop`: stop the stack on a run dir from another shell (the first one hung up, or
was never a terminal). SIGTERM to `duet run`, which stops its children in order and writes
its summary; with no `duet run` there, to the follower holding the run dir (an orphan: its
controlled stop, torque per follower.stop_action). Waits until the locks are released."""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from runtime.ipc import endpoints, rundir

# `duet run` stops planner, follower, recorder, sim one after another, 8 s each at worst
STOP_WAIT_S = 40.0


@dataclass(frozen=True)
class Stopped:
    what: str  # "duet run" | "follower" | "" (nothing was running)
    pid: int | None
    done: bool  # the run dir is free
    detail: str


def running(run_dir: str) -> tuple[str, int | None, str]:
    """What holds the run dir: ("duet run" | "follower", pid, lock file), or ("", None, "")."""
    for what, lock in (("duet run", endpoints.SUPERVISOR_LOCK),
                       ("follower", endpoints.FOLLOWER_LOCK)):
        held, pid = rundir.holder(run_dir, lock)
        if held:
            return what, pid, lock
    return "", None, ""


def stop(run_dir: str, wait_s: float = STOP_WAIT_S) -> Stopped:
    what, pid, lock = running(run_dir)
    if not what:
        return Stopped("", None, True, f"nothing running on {run_dir}")
    if pid is None:
        return Stopped(what, None, False, f"{what} holds {Path(run_dir) / lock} but its pid "
                       "is unknown")
    try:
        os.kill(pid, signal.SIGTERM)
    except PermissionError:
        return Stopped(what, pid, False, f"{what} (pid {pid}) belongs to another user: run "
                       "duet stop as that user (or with sudo)")
    except ProcessLookupError:
        pass  # it ended between the lock check and the signal
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if not any(rundir.holder(run_dir, name)[0]
                   for name in (endpoints.SUPERVISOR_LOCK, endpoints.FOLLOWER_LOCK)):
            return Stopped(what, pid, True, f"stopped {what} (pid {pid}) on {run_dir}")
        time.sleep(0.05)
    return Stopped(what, pid, False, f"{what} (pid {pid}) still holds {run_dir} after "
                   f"{wait_s:g} s")
