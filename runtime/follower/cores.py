"""Which core the follower pins: one follower per core on a host.

Two stacks on one machine (tests in parallel, a developer running two demos) must not pin two
SCHED_FIFO followers onto the same core, where each waits out the other's tick. A follower's
core is claimed with an flock on `LOCK_DIR/duet-cpu<N>.lock` (the kernel drops it when the
holder dies: no stale claims); when the configured core is taken, the follower takes a free
one, and when every core is taken it shares the configured one and says with whom.

`duet run` claims the core before it starts the follower (so it can keep the sim and the
planner off it) and passes the choice on; the follower finds the claim held by its parent
and takes it as its own. A follower started by systemd claims for itself.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from runtime.ipc.rundir import LockHeld, RunLock


def lock_dir() -> Path:
    """/run/lock (tmpfs, world-writable on Debian and Ubuntu), else the temp dir."""
    run_lock = Path("/run/lock")
    if run_lock.is_dir() and os.access(run_lock, os.W_OK):
        return run_lock
    return Path(tempfile.gettempdir())


class CoreClaim:
    """The follower's core: `cpu` (None: no pinning asked), the lock held for it (None when
    shared or claimed by the parent) and one line saying what happened."""

    def __init__(self, cpu: int | None, lock: RunLock | None, report: str | None) -> None:
        self.cpu = cpu
        self.lock = lock
        self.report = report

    def release(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def claim_core(preferred: int | None, directory: Path | None = None) -> CoreClaim:
    """Claim `preferred` if free (or already claimed by this process's parent), else a free
    core this process may run on, else share `preferred` (reported with its holder)."""
    if preferred is None:
        return CoreClaim(None, None, None)
    directory = directory or lock_dir()
    allowed = sorted(os.sched_getaffinity(0))
    if preferred not in allowed:
        return CoreClaim(preferred, None, None)  # pinning will fail and say so
    holders: dict[int, int | None] = {}
    # the configured core first, then the others from the highest (cpu 0 takes interrupts)
    for cpu in [preferred, *sorted((c for c in allowed if c != preferred), reverse=True)]:
        lock = RunLock(directory, f"duet-cpu{cpu}.lock")
        try:
            lock.acquire()
        except LockHeld as held:
            if held.pid == os.getppid():  # `duet run` claimed it for this follower
                return CoreClaim(cpu, None, None)
            holders[cpu] = held.pid
            continue
        if cpu == preferred:
            return CoreClaim(cpu, lock, None)
        return CoreClaim(cpu, lock, f"cpu {preferred} is the follower core of pid "
                                    f"{holders[preferred] or '?'} (another stack): "
                                    f"this follower takes cpu {cpu}")
    return CoreClaim(preferred, None, f"every core has a follower already: sharing cpu "
                                      f"{preferred} with pid {holders[preferred] or '?'}")
