"""SIGTERM (systemd, `duet run`, `duet stop`), SIGINT (Ctrl-C) and SIGHUP (the SSH session
that started it dropped) ask a duet process to stop: the handler only sets a flag; the
process's loop sees it at its next turn and shuts down in order. SIGHUP's default would end
the process on the spot, skipping the controlled stop (and for `duet run`, leaving its
children running unsupervised)."""

from __future__ import annotations

import ctypes
import os
import signal
from typing import Any, Protocol

# `duet run` puts its pid here for its children: they stop when it dies, even by SIGKILL.
SUPERVISOR_ENV = "DUET_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1


class Stoppable(Protocol):
    stop_requested: bool


def stop_on_signals(target: Stoppable) -> None:
    def _stop(_signum: int, _frame: Any) -> None:
        target.stop_requested = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _stop)
    stop_with_supervisor()


def stop_with_supervisor() -> None:
    """A child of `duet run`: SIGTERM (the controlled stop) when the supervisor dies, however
    it dies, so a stack is never left running unsupervised. Call after the SIGTERM handler is
    installed; a no-op for a process systemd started."""
    parent = os.environ.get(SUPERVISOR_ENV, "")
    if not parent.isdigit():
        return
    ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != int(parent):  # it died before the prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)
