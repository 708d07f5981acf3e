"""SIGTERM (systemd, `duet run`, `duet stop`), SIGINT (Ctrl-C) and SIGHUP (the SSH session
that started it dropped) ask a duet process to stop: the handler only sets a flag; the
process's loop sees it at its next turn and shuts down in order. SIGHUP's default would end
the process on the spot, skipping the controlled stop (and for `duet run`, leaving its
children running unsupervised).

Python runs a signal's handler only when the main thread is back in the interpreter, not
while it waits in a long native call (a planner's engine run of seconds). `interrupt` is then
called at once from a watcher thread woken by the C-level handler (`signal.set_wakeup_fd`),
so the call can be stopped from outside (ONNX Runtime's RunOptions.terminate)."""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol

# `duet run` puts its pid here for its children: they stop when it dies, even by SIGKILL.
SUPERVISOR_ENV = "DUET_SUPERVISOR_PID"
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class Stoppable(Protocol):
    stop_requested: bool


def stop_on_signals(target: Stoppable, interrupt: Callable[[], None] | None = None) -> None:
    def _stop(_signum: int, _frame: Any) -> None:
        target.stop_requested = True

    for sig in STOP_SIGNALS:
        signal.signal(sig, _stop)
    if interrupt is not None:
        _watch(interrupt)
    stop_with_supervisor()


def _watch(interrupt: Callable[[], None]) -> None:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)

    def watcher() -> None:
        while True:
            got = os.read(read_fd, 64)
            if not got:
                return
            if any(b in STOP_SIGNALS for b in got):
                interrupt()

    threading.Thread(target=watcher, name="stop-signals", daemon=True).start()


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
