"""Real-time setup and the deadline wait for the follower.

Everything here is best effort: where the privilege is missing the follower still runs and
says so (the report goes to the log and to `duet doctor`).
"""

from __future__ import annotations

import gc
import os
from typing import Any


def apply_realtime(priority: int, cpu: int | None, mlock: bool) -> list[str]:
    """Request SCHED_FIFO, CPU pinning and mlockall; return one line per outcome."""
    report: list[str] = []
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
            report.append(f"pinned to cpu {cpu}")
        except (OSError, ValueError) as exc:
            report.append(f"cpu pinning to {cpu} not permitted: {exc}")
    if priority > 0:
        current = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
        if current == os.SCHED_FIFO:  # already set by systemd (CPUSchedulingPolicy=fifo)
            report.append(f"SCHED_FIFO priority {os.sched_getparam(0).sched_priority} "
                          "(set by the service manager)")
        else:
            try:
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
                report.append(f"SCHED_FIFO priority {priority}")
            except (OSError, AttributeError) as exc:
                report.append(f"SCHED_FIFO not permitted ({exc}); running SCHED_OTHER")
    if mlock:
        report.append(_mlockall())
    return report


def _mlockall() -> str:
    import ctypes
    import ctypes.util

    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return "mlockall unavailable (no libc found)"
    libc: Any = ctypes.CDLL(libc_name, use_errno=True)
    mcl_current, mcl_future, mcl_onfault = 1, 2, 4
    # MCL_ONFAULT (Linux 4.4+): lock each page when it is first touched instead of every
    # mapped page now -- whole thread stacks and untouched library pages otherwise count as
    # resident (340 MB). The loop's working set is touched before the first deadline (the
    # start-up read, the warm engine call) and stays locked; nothing is ever paged out.
    if libc.mlockall(mcl_current | mcl_future | mcl_onfault) == 0:
        return "memory locked as touched (mlockall, MCL_ONFAULT)"
    if libc.mlockall(mcl_current | mcl_future) != 0:
        return f"mlockall not permitted (errno {ctypes.get_errno()})"
    return "memory locked (mlockall)"


def freeze_gc() -> None:
    """Move everything allocated at start-up out of the collector's way; collect only
    between deadlines (see `collect_if_slack`)."""
    gc.collect()
    gc.freeze()
    gc.disable()


def collect_if_slack(slack_ns: int, min_slack_ns: int = 500_000) -> bool:
    """Run a young-generation collection when the tick has this much slack left."""
    if slack_ns > min_slack_ns and gc.get_count()[0] > 700:
        gc.collect(0)
        return True
    return False
