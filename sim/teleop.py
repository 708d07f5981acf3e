"""`duet teleop`: collect demonstrations on the simulated robot the way an operator collects
them on a real one. The stack runs without its planner (sim + follower, supervised as by
`duet run`), the scripted expert teleoperates (sim/operator.py), the flight recorder runs as
its own process, and each sim episode is one named recording: `record start` when the sim
announces the episode, `record stop` when it reports the result (the recorder keeps the
sim's outcome). The episode in progress when recording begins is not recorded (it started
before the recorder could see it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from runtime.config import DuetConfig
from runtime.ipc import endpoints
from runtime.ipc.follower_mode import LATCHED_MODES, follower_mode
from runtime.ipc.messages import MessageError, decode
from runtime.ipc.sockets import open_socket
from runtime.model.robot_bundle import robot_bundle
from runtime.planner.shell import PlannerShell
from runtime.stack.recording import RecorderProcess, RecordingError
from runtime.stack.supervisor import Supervisor
from sim.operator import ExpertSource

log = logging.getLogger("duet.teleop")


class TeleopError(RecordingError):
    """A session that could not collect what was asked (the recorder's own errors are its
    base class: the command reports both)."""


def collect(cfg: DuetConfig, out: Path, episodes: int, prefix: str = "teleop",
            frame_hz: float = 10.0, timeout_s: float | None = None,
            log_line: Any = print, during: Callable[[int], None] | None = None
            ) -> list[dict[str, Any]]:
    """Record `episodes` sim episodes under out/episodes/; the recorder's stop replies.
    `during(n)` runs right after the n-th recording starts (an operator's action: an estop)."""
    sup = Supervisor(cfg, "teleop", record=False)
    operator: PlannerShell | None = None
    recorder: RecorderProcess | None = None
    thread = None
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sub = open_socket(ctx, zmq.SUB, endpoints.MAX_SIM_BYTES)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    results: list[dict[str, Any]] = []
    timeout_s = timeout_s or episodes * 2.0 * (cfg.sim.episode_timeout_s if cfg.sim else 12.0)
    try:
        sup.start(with_planner=False)
        recorder = RecorderProcess(cfg, out, frame_hz)
        bundle = robot_bundle(cfg)
        operator = PlannerShell(cfg, bundle.version, ExpertSource(cfg, bundle), cameras={})
        thread = threading.Thread(target=operator.run, name="operator", daemon=True)
        thread.start()
        sub.connect(endpoints.sim(cfg.run_dir))
        current: int | None = None  # the sim episode being recorded
        first_seen: int | None = None
        deadline = time.monotonic() + timeout_s
        while len(results) < episodes:
            if time.monotonic() > deadline:
                raise TeleopError(f"{len(results)} of {episodes} episodes in {timeout_s:.0f} s")
            if not sub.poll(200):
                continue
            try:
                msg = decode(sub.recv())
            except MessageError:
                continue
            index = msg.get("episode")
            if msg.get("type") == "task" and isinstance(index, int):
                if first_seen is None:
                    first_seen = index  # already under way: not recorded
                elif current is None and index > first_seen:
                    current = index
                    recorder.ask("start", {"name": f"{prefix}-{len(results):03d}"})
                    if during is not None:
                        during(len(results))
            elif msg.get("type") == "episode" and index == current:
                result = recorder.ask("stop", {})
                results.append(result)
                log_line(f"  teleop: {Path(result['path']).name} {result['outcome']} "
                         f"({msg.get('duration_s')} s) {msg.get('instruction')!r}")
                current = None
                first_seen = index
                mode = follower_mode(cfg.run_dir)
                if mode in LATCHED_MODES:  # latched: what follows would be no demonstration
                    raise TeleopError(f"the follower is in {mode} after {len(results)} "
                                      "episodes; recordings so far are kept")
    finally:
        if operator is not None:
            operator.stop_requested = True
        if thread is not None:
            thread.join(timeout=5)
        if operator is not None:
            operator.close()
        sub.close(linger=0)
        if recorder is not None:
            recorder.close()
        sup.stop()
    return results
