"""What the planner process publishes and leaves behind, typed once here beside its writer
(runtime/planner/shell.py): its telemetry (every cycle, on `telemetry-planner`) and its summary
(`planner-summary.json` in the run dir at exit). `duet status`, `duet top`, the recorder and
`duet run`'s summary import these types, so a key one side renames is a type error on the
other. Percentile blocks are {"p50": ..., "p99": ...} in the unit their key names."""

from __future__ import annotations

from typing import Any, TypedDict


class SourceFigures(TypedDict, total=False):
    """What a plan source adds (runtime/planner/shell.py `PlanSource.figures`)."""

    stage_ms: dict[str, dict[str, float]]  # per pipeline stage, plus total and engines
    inference_ms: dict[str, float]  # the model's call per plan (off-board: the server's)
    remote: dict[str, Any]  # the relay's link figures (runtime/remote/relay.py ServerLink)


class PlannerTelemetry(SourceFigures):
    source: str  # "planner"
    status: str  # planning, idle, no_state, camera_stale (NAME), remote: ..., ...
    plans: int
    achieved_hz: float
    bundle: str
    latency_ms: dict[str, float]  # observation -> plan published
    camera_age_ms: dict[str, float | None]
    instruction: str
    episode: Any
    dropped_messages: dict[str, int]
    in_plan_s: float | None  # how long the plan in progress has run (None: between plans)


class PlannerSummary(SourceFigures):
    plans: int
    achieved_hz: float
    latency_ms: dict[str, float]
    load_s: float | None  # process start -> bundle verified, engines loaded, sockets bound
    first_plan_s: float | None  # process start -> first plan published (None: no plan)
    dropped_messages: dict[str, int]
