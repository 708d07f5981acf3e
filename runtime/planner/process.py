"""The planner process (what duet-planner.service runs): a shell (runtime/planner/shell.py)
composed with a plan source, run until stopped, its summary left in the run dir.

Which source is the caller's choice (`duet planner` picks the pipeline here or the relay to
an off-board server), so this room never imports the remote one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

from drivers.bus import BusError
from drivers.camera import CameraError
from runtime.config import DuetConfig
from runtime.ipc import endpoints
from runtime.ipc.keys import KeyFileError
from runtime.ipc.notify import notifier as make_notifier
from runtime.ipc.signals import stop_on_signals
from runtime.model.bundle import Bundle, BundleError
from runtime.model.engines import EngineError
from runtime.model.robot_bundle import robot_bundle
from runtime.model.timing import declared_checks
from runtime.planner.local import PipelineSource
from runtime.planner.pipeline import PipelineError
from runtime.planner.shell import PlannerShell, PlanSource

log = logging.getLogger("duet.planner")

# ONNX Runtime's TensorRT provider builds its engines at the first start (minutes on a Jetson,
# then cached): systemd is asked to wait this long rather than kill a build that restarts at 0.
ENGINE_BUILD_TIMEOUT_S = 900

SourceFactory = Callable[[DuetConfig, Bundle], PlanSource]


def run_planner(cfg: DuetConfig, duration_s: float | None = None,
                source: SourceFactory = PipelineSource) -> int:
    started_ns = time.monotonic_ns()  # load_s and first_plan_s count from here
    if cfg.bundle.engine == "onnxruntime" and \
            "tensorrt" in cfg.bundle.onnxruntime.planner_providers:
        make_notifier().notify(f"EXTEND_TIMEOUT_USEC={ENGINE_BUILD_TIMEOUT_S * 1_000_000}")
    try:
        bundle = robot_bundle(cfg)
        planner = PlannerShell(cfg, bundle.version, source(cfg, bundle),
                               started_ns=started_ns)
    except (BundleError, EngineError, BusError, CameraError, PipelineError, KeyError,
            KeyFileError) as exc:
        log.error("%s", exc)
        return 2

    for _, why in declared_checks(bundle.contract, cfg):  # failures refused the start
        log.warning("planner.latency: %s", why)
    stop_on_signals(planner, planner.interrupt)
    try:
        planner.run(duration_s)
    finally:
        Path(cfg.run_dir, endpoints.PLANNER_SUMMARY).write_text(json.dumps(planner.summary()))
        planner.close()
    return 0
