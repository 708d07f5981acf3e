"""Plans made on this host by the bundle's pipeline (runtime/planner/pipeline.py)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.config import DuetConfig
from runtime.ipc.stats import summarize
from runtime.model.bundle import Bundle
from runtime.model.engines import EngineError, EngineInterrupted
from runtime.model.tokenizer import TokenizerError
from runtime.planner.observation import ObservationError
from runtime.planner.pipeline import Observation, PlannerPipeline
from runtime.planner.records import SourceFigures
from runtime.planner.shell import PlannerShell, PlanSource
from runtime.planner.tasks import TaskError


class PipelineSource(PlanSource):
    def __init__(self, cfg: DuetConfig, bundle: Bundle) -> None:
        self.pipeline = PlannerPipeline.configured(bundle, cfg)

    def camera_names(self) -> Sequence[str]:
        return self.pipeline.camera_names()

    def check_instruction(self, text: str) -> None:
        try:
            self.pipeline.check_instruction(text)
        except TokenizerError as exc:
            raise TaskError(str(exc)) from None

    def cycle(self, shell: PlannerShell) -> None:
        got = shell.observe()
        if got is None:
            return
        frames, t_obs = got
        self.pipeline.set_instruction(shell.instruction)
        try:
            waypoints = self.pipeline.plan(Observation(frames, shell.history, t_obs),
                                           shell.last_plan, shell.expected_latency_s())
        except EngineInterrupted:
            shell.status = "stopping"  # the plan was interrupted: the loop ends
            return
        except (ObservationError, EngineError) as exc:
            shell.status = f"bad_observation: {exc}"
            return
        if not np.isfinite(waypoints).all():
            shell.status = "nonfinite_output"
            return
        shell.publish(waypoints, self.pipeline.dt_s, t_obs, shell.episode)

    def interrupt(self) -> None:
        self.pipeline.interrupt()

    def figures(self, last: int | None) -> SourceFigures:
        # inference: the model's whole call per plan (what `latency_ms` adds to it is waiting
        # for inputs and publishing)
        return {"stage_ms": self.pipeline.stage_ms(last),
                "inference_ms": summarize(self.pipeline.plan_ms.values(last), ("p50", "p99"),
                                          digits=2)}

