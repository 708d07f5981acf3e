"""Structured logging to stderr (journald captures it under systemd); never used in a tick."""

from __future__ import annotations

import logging
import os
import sys


class _KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        proc = os.environ.get("DUET_PROCESS", record.name.rsplit(".", 1)[-1])
        msg = record.getMessage().replace('"', "'")
        line = f'level={record.levelname.lower()} proc={proc} logger={record.name} msg="{msg}"'
        if record.exc_info:
            line += " exc=" + repr(self.formatException(record.exc_info))
        return line


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(os.environ.get("DUET_LOG_LEVEL", level).upper())
