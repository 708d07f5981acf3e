"""The planner's current task: set by an operator or a task source, checked against the
model's tokenizer, kept in the run dir so a restarted planner carries on with it."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MAX_INSTRUCTION_CHARS = 1000


class TaskError(ValueError):
    """A task that cannot be set; the text says why (unknown words, too long, ...)."""


@dataclass(frozen=True)
class Task:
    instruction: str
    episode: int | str | None
    source: str  # operator | sim | config
    set_unix_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class TaskStore:
    def __init__(self, path: Path, check: Callable[[str], None]) -> None:
        """`check(text)` raises TaskError (with the reason) when the model cannot take `text`."""
        self.path = path
        self.check = check
        self.current: Task | None = self._load()

    def _load(self) -> Task | None:
        try:
            data = json.loads(self.path.read_text())
            task = Task(str(data["instruction"]), data.get("episode"), str(data["source"]),
                        float(data["set_unix_s"]))
            self.check(task.instruction)
        except Exception:  # absent, corrupt or no longer valid for this model: no task
            return None
        return task

    def set(self, instruction: str, episode: int | str | None, source: str) -> Task:
        text = instruction.strip()
        if not text:
            raise TaskError("empty instruction: use clear")
        if len(text) > MAX_INSTRUCTION_CHARS:
            raise TaskError(f"instruction longer than {MAX_INSTRUCTION_CHARS} characters")
        if isinstance(episode, str) and len(episode) > 200:
            raise TaskError("episode id longer than 200 characters")
        self.check(text)
        self.current = Task(text, episode, source, time.time())
        self._save()
        return self.current

    def clear(self, source: str) -> None:
        self.current = None
        self._save()

    def _save(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            if self.current is None:
                self.path.unlink(missing_ok=True)
                return
            tmp.write_text(json.dumps(self.current.as_dict()))
            os.replace(tmp, self.path)
        except OSError:
            pass  # a read-only run dir: the task still holds in memory
