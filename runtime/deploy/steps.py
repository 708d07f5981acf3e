"""External steps of `duet install` and `duet pack`: each runs a tool, and any way it fails
(missing tool, exit code) becomes one line naming the command, why, and the fix."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Sequence

Runner = Callable[[Sequence[str]], None]
Capture = Callable[[Sequence[str]], str]


class InstallError(Exception):
    """A step that failed; the message is one line naming it, the reason and the fix."""


class StepFailed(InstallError):
    pass


def run_checked(cmd: Sequence[str], to_stderr: bool = False) -> None:
    """Run an external step; its stderr goes to ours, its failure raises with the last line.
    `to_stderr`: its stdout too (a --json command keeps stdout for its one object)."""
    stream = sys.stderr if to_stderr else sys.stdout
    print("+ " + " ".join(cmd), flush=True, file=stream)
    out = subprocess.run(list(cmd), stdout=stream, stderr=subprocess.PIPE, text=True)
    if out.stderr:
        sys.stderr.write(out.stderr)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [""])[-1]
        raise subprocess.CalledProcessError(out.returncode, list(cmd), stderr=last)


def run_to_stderr(cmd: Sequence[str]) -> None:
    run_checked(cmd, to_stderr=True)


def log_to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def capture_checked(cmd: Sequence[str]) -> str:
    """Run a query step and return its stdout; its failure raises with stderr's last line."""
    out = subprocess.run(list(cmd), capture_output=True, text=True)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or [""])[-1]
        raise subprocess.CalledProcessError(out.returncode, list(cmd), stderr=last)
    return out.stdout


def external(run: Runner, cmd: Sequence[str], fix: str) -> None:
    """One external step; any way it fails (missing tool, exit code) is a one-line StepFailed."""
    try:
        run(cmd)
    except subprocess.CalledProcessError as exc:
        why = f"exit {exc.returncode}" + (f": {exc.stderr.strip()}" if exc.stderr else "")
        raise StepFailed(f"`{' '.join(cmd)}` failed ({why}); fix: {fix}") from None
    except (OSError, subprocess.SubprocessError) as exc:
        raise StepFailed(f"`{' '.join(cmd)}` could not run ({exc}); fix: {fix}") from None
