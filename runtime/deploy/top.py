"""`duet top`: live view of follower and planner telemetry for a plain SSH terminal.

rich.live redraws in place; `q` or Ctrl-C quits. Works without a tty too (then only
Ctrl-C/SIGTERM stop it), so it can run under tmux, screen or a serial console.
"""

from __future__ import annotations

import contextlib
import os
import select
import sys
import termios
import time
import tty
from collections.abc import Iterator

from rich.console import Console
from rich.live import Live

from runtime.deploy.ipc import TelemetrySubscriber
from runtime.deploy.telemetry_view import render


@contextlib.contextmanager
def _cbreak(stream: object) -> Iterator[bool]:
    """Single-key input when stdin is a terminal; yields whether keys can be read."""
    fd = stream.fileno() if hasattr(stream, "fileno") else -1
    if fd < 0 or not os.isatty(fd):
        yield False
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield True
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _quit_pressed() -> bool:
    ready, _, _ = select.select([sys.stdin], [], [], 0)
    return bool(ready) and sys.stdin.read(1) in ("q", "Q")


def run_top(run_dir: str, refresh_hz: float = 4.0, duration_s: float | None = None) -> int:
    sub = TelemetrySubscriber(run_dir)
    # On a terminal follow its real size (and resizes); stale COLUMNS/LINES exported by a
    # parent shell or tool would otherwise pin the layout to 80x24.
    environ = ({k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
               if sys.stdout.isatty() else None)
    console = Console(_environ=environ)
    period = 1.0 / refresh_hz
    end = None if duration_s is None else time.monotonic() + duration_s
    title = f"duet top  ({run_dir})   q: quit"
    try:
        with _cbreak(sys.stdin) as keys, Live(
            render({}, title=title), console=console, refresh_per_second=refresh_hz,
            screen=console.is_terminal, transient=False,
        ) as live:
            while end is None or time.monotonic() < end:
                sub.poll(period)
                now = time.monotonic()
                ages = {s: now - t for s, t in sub.received_at.items()}
                # a source silent for 2 s is shown as gone, not as its last good numbers
                latest = {s: m for s, m in sub.latest.items() if ages[s] < 2.0}
                live.update(render(latest, ages, title=title))
                if keys and _quit_pressed():
                    break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    return 0
