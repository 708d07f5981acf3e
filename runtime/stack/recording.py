"""A flight recorder of the session's own (`duet record serve` as a child process), for the
commands that collect data on a running stack: `duet teleop` and `duet identify`. Recordings
are made exactly as on the robot: the same process, the same files, named by the caller."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from runtime.config import DuetConfig
from runtime.ipc import endpoints
from runtime.ipc.rpc import ControlError, request_at


class RecordingError(RuntimeError):
    pass


class RecorderProcess:
    def __init__(self, cfg: DuetConfig, out: Path, frame_hz: float = 10.0,
                 ready_timeout_s: float = 30.0) -> None:
        """Start a recorder writing under `out` (episodes/NAME.mcap) for the stack in
        cfg.run_dir, and wait for its control socket."""
        self.cfg = cfg
        effective = Path(cfg.run_dir) / endpoints.EFFECTIVE_CONFIG
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "runtime.cli", "record", "serve", "--config", str(effective),
             "--run-dir", cfg.run_dir, "--dir", str(out), "--frame-hz", str(frame_hz)],
            start_new_session=True)
        deadline = time.monotonic() + ready_timeout_s
        while not (Path(cfg.run_dir) / "recorder").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RecordingError(f"the recorder did not start (exit {self.proc.poll()})")
            time.sleep(0.05)

    def ask(self, cmd: str, args: dict[str, Any]) -> dict[str, Any]:
        """`start` {name} / `stop` {success} / `status`: the recorder's reply, or raise."""
        try:
            reply = request_at(endpoints.recorder(self.cfg.run_dir), cmd, args, timeout_s=10.0)
        except ControlError as exc:
            raise RecordingError(f"recorder {cmd}: {exc}") from None
        if not reply.get("ok"):
            raise RecordingError(f"recorder {cmd}: {reply.get('error')}")
        return dict(reply["result"])

    def close(self) -> None:
        """Stop it (an open recording is closed and kept)."""
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
