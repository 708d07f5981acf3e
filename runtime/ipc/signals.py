"""SIGTERM (systemd, `duet run`) and SIGINT (Ctrl-C) ask a duet process to stop: the handler
only sets a flag; the process's loop sees it at its next turn and shuts down in order."""

from __future__ import annotations

import signal
from typing import Any, Protocol


class Stoppable(Protocol):
    stop_requested: bool


def stop_on_signals(target: Stoppable) -> None:
    def _stop(_signum: int, _frame: Any) -> None:
        target.stop_requested = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
