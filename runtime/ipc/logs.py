"""Structured logging to stderr (journald captures it under systemd); never used in a tick."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        proc = os.environ.get("DUET_PROCESS", record.name.rsplit(".", 1)[-1])
        msg = record.getMessage().replace('"', "'")
        line = f'level={record.levelname.lower()} proc={proc} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


def key_values(counts: Mapping[str, object]) -> str:
    """`a=1 b=2` for people and log readers (never a Python dict's repr); `none` if empty."""
    return " ".join(f"{k}={v}" for k, v in counts.items()) or "none"


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("DUET_LOG_LEVEL", level).upper())


class ChangeLog:
    """A value that changes often, logged once per real change: a new value is said once it
    has held for `settle_s`. Changes that never settled (a planner's status going planning /
    camera_stale / planning under load: 36 lines a minute) are counted and said in one line
    at most every `report_s`, or with the next value that settles."""

    def __init__(self, log: logging.Logger, what: str, settle_s: float = 2.0,
                 report_s: float = 30.0) -> None:
        self.log, self.what = log, what
        self.settle_s, self.report_s = settle_s, report_s
        self.said: str | None = None  # what the log last said
        self.value: str | None = None  # the value now, settled or not
        self.since_s = 0.0  # when it took this value
        self.brief = 0  # changes since the last line
        self.window_s = 0.0  # when the last line was said (or the first value came)

    def update(self, value: str, now_s: float) -> None:
        if value != self.value:
            if self.value is None:
                self.window_s = now_s
            else:
                self.brief += 1
            self.value, self.since_s = value, now_s
        if value != self.said and now_s - self.since_s >= self.settle_s:
            extra = (f" (after {self.brief - 1} briefer changes in "
                     f"{now_s - self.window_s:.0f} s)") if self.brief > 1 else ""
            self.log.info("%s: %s%s", self.what, value, extra)
            self.said, self.brief, self.window_s = value, 0, now_s
        elif self.brief and now_s - self.window_s >= self.report_s:
            self.log.info("%s: %s, after %d changes in %.0f s, each shorter than %g s",
                          self.what, value, self.brief, now_s - self.window_s, self.settle_s)
            self.brief, self.window_s = 0, now_s
