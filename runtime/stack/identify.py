"""`duet identify`: drive the robot through excitation trajectories and record it.

The stack runs as `duet run` starts it but without its planner and with the follower's
residual off (plain reference tracking: what is measured is the servos, not a follower); the
excitation (runtime/planner/excitation.py) is the plan source, through the planner shell, so
plans travel the robot's own path and every safety check applies. The flight recorder runs
as its own process and each phase is one named recording.

Phases: *slow* (a quarter of the speed, half the span), then, once the operator confirms,
*full*. An e-stop or a fault at any time ends the session: what was recorded is kept, the
follower stays latched as always, and the session says so.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from runtime.config import DuetConfig
from runtime.ipc.follower_mode import LATCHED_MODES, follower_mode
from runtime.model.robot_bundle import robot_bundle
from runtime.planner.excitation import Box, Excitation, ExcitationSource
from runtime.planner.shell import PlannerShell
from runtime.stack.recording import RecorderProcess, RecordingError
from runtime.stack.supervisor import Supervisor

log = logging.getLogger("duet.identify")

class IdentifyError(RecordingError):
    pass


@dataclass(frozen=True)
class Phase:
    name: str
    speed: float  # fraction of each joint's velocity limit
    span: float  # rad around the start pose
    sweep_s: float
    poses: int
    rate: float  # frequency scale of the sweep


def phases(span: float, speed: float, sweep_s: float, poses: int) -> list[Phase]:
    """The slow phase first (the operator watches it), then the full one."""
    return [Phase("slow", speed * 0.25, span * 0.5, sweep_s * 0.5, max(2, poses // 3), 0.4),
            Phase("full", speed, span, sweep_s, poses, 1.0)]


def identify(cfg: DuetConfig, out: Path, plan: list[Phase], seed: int = 0,
             confirm: Callable[[Phase], bool] = lambda _: True,
             log_line: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run the phases; the recorder's stop replies (path, outcome, ...), one per phase run."""
    cfg = cfg.model_copy(update={"follower": cfg.follower.model_copy(update={"residual": False})})
    sup = Supervisor(cfg, "identify", record=False)
    recorder: RecorderProcess | None = None
    results: list[dict[str, Any]] = []
    try:
        sup.start(with_planner=False)
        recorder = RecorderProcess(cfg, out, frame_hz=1.0)
        actions = robot_bundle(cfg).contract.planner.actions
        lim = cfg.robot.limits
        for i, phase in enumerate(plan):
            if i and not confirm(phase):
                log_line(f"  identify: stopped before the {phase.name} phase (not confirmed)")
                break

            def make(q0: np.ndarray, phase: Phase = phase, k: int = seed + i) -> Excitation:
                box = Box.around(q0, phase.span, lim.position_min, lim.position_max,
                                 lim.velocity_max, phase.speed)
                return Excitation(q0, box, phase.sweep_s, phase.poses, k, phase.rate)

            source = ExcitationSource(make, actions.horizon, actions.dt_s)
            result, mode = _run_phase(cfg, recorder, phase, source)
            results.append(result)
            seconds = source.excitation.duration if source.excitation else 0.0
            log_line(f"  identify: {phase.name}: {Path(result['path']).name} "
                     f"({seconds:.0f} s, {result['outcome']})")
            if mode in LATCHED_MODES:
                raise IdentifyError(f"the follower is in {mode} during the {phase.name} phase; "
                                    f"recordings so far are kept in {out}/episodes")
    finally:
        if recorder is not None:
            recorder.close()
        sup.stop()
    return results


def _run_phase(cfg: DuetConfig, recorder: RecorderProcess, phase: Phase,
               source: ExcitationSource) -> tuple[dict[str, Any], str | None]:
    shell = PlannerShell(cfg, "identify", source, cameras={})
    thread = threading.Thread(target=shell.run, name=f"identify-{phase.name}", daemon=True)
    recorder.ask("start", {"name": f"identify-{phase.name}"})
    thread.start()
    mode: str | None = None
    try:
        t_begin = time.monotonic()
        while not source.done:
            time.sleep(0.2)
            mode = follower_mode(cfg.run_dir)
            if mode in LATCHED_MODES:
                break
            started, excitation = source.t_start_ns, source.excitation
            # the excitation's length is known once the first state has come in
            end = (started / 1e9 + excitation.duration if started and excitation
                   else t_begin) + 30.0
            if time.monotonic() > end:
                raise IdentifyError(f"the {phase.name} phase did not finish: "
                                    f"{'no joint state' if not started else 'no progress'}")
        time.sleep(0.5)  # the last plan's end at rest, recorded
    finally:
        shell.stop_requested = True
        thread.join(timeout=5)
        shell.close()
    result = recorder.ask("stop", {"success": mode not in LATCHED_MODES})
    return result, mode
