"""ZeroMQ's I/O threads at real-time priority.

Every message between two processes passes through each side's libzmq I/O thread: a plan
waits for the planner's thread to be scheduled, then for the follower's. Left SCHED_OTHER,
those threads queue behind whatever else the host runs (milliseconds under load) while the
follower itself is SCHED_FIFO. `realtime_io_threads` gives them SCHED_FIFO at the given
priority; it must run before the context's first socket (the threads start with it).
libzmq aborts the process when the kernel refuses the policy, so the privilege is probed
first on a throwaway thread, and where it is missing the threads stay as they are (and the
report says so).
"""

from __future__ import annotations

import os
import threading

import zmq


def fifo_permitted(priority: int) -> bool:
    """Whether a thread of this process may run SCHED_FIFO at `priority` (probed on a
    short-lived thread: the caller's own scheduling is untouched)."""
    allowed: list[bool] = []

    def probe() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
            allowed.append(True)
        except (OSError, AttributeError):
            allowed.append(False)

    thread = threading.Thread(target=probe, name="duet-fifo-probe")
    thread.start()
    thread.join()
    return allowed[0]


def realtime_io_threads(ctx: zmq.Context[zmq.Socket[bytes]], priority: int) -> str | None:
    """SCHED_FIFO `priority` for `ctx`'s I/O threads; one report line (None: not asked)."""
    if priority <= 0:
        return None
    if not fifo_permitted(priority):
        return f"ZeroMQ I/O threads: SCHED_FIFO {priority} not permitted; SCHED_OTHER"
    ctx.set(zmq.THREAD_SCHED_POLICY, os.SCHED_FIFO)
    ctx.set(zmq.THREAD_PRIORITY, priority)
    return f"ZeroMQ I/O threads: SCHED_FIFO priority {priority}"
