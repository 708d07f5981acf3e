"""Where the planner server's observations are planned: a `Backend`.

The server hands a backend jobs (observations from different robots) as long as it has
capacity, and collects finished ones with `poll`, so an asynchronous backend can keep several
engine calls in flight while the server goes on receiving. `LocalBackend` is this host's
engine: one call takes up to the bundle's batch of observations (a bundle exported with
`planner.batch: N`), a batch-1 bundle plans them one after another. `RayBackend`
(runtime/remote/ray_backend.py) hands them to a Ray Serve deployment for more than one GPU host.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from runtime.ipc.stats import Ring
from runtime.model.engines import EngineError
from runtime.planner.pipeline import PlannerPipeline, PlanRequest


@dataclass
class Job:
    robot: str  # the session it answers (the robot's name)
    route: bytes  # the connection the observation came on
    seq: int  # the observation's seq, echoed in the plan
    episode: Any
    request: PlanRequest
    t_recv_ns: int = field(default_factory=time.monotonic_ns)  # server clock


Result = np.ndarray | str  # waypoints [H, n_robot], or why there are none


class Backend(Protocol):
    batch: int  # observations per engine call
    sizes: Ring  # per observation planned: how many shared its engine call

    def capacity(self) -> int:
        """How many more jobs `submit` takes now."""
        ...

    def in_flight(self) -> int:
        """Jobs submitted and not yet returned by `poll`."""
        ...

    def submit(self, jobs: list[Job]) -> None: ...

    def poll(self) -> list[tuple[Job, Result]]:
        """Finished jobs, each once."""
        ...

    def close(self) -> None: ...


class LocalBackend:
    """The bundle's pipeline on this host, synchronous: `submit` runs the engine calls."""

    def __init__(self, pipeline: PlannerPipeline) -> None:
        self.pipeline = pipeline
        self.batch = pipeline.batch
        self.sizes = Ring(1 << 14)
        self._done: list[tuple[Job, Result]] = []

    def capacity(self) -> int:
        return self.batch

    def in_flight(self) -> int:
        return 0  # `submit` returns when its calls are done

    def submit(self, jobs: list[Job]) -> None:
        for start in range(0, len(jobs), self.batch):
            chunk = jobs[start:start + self.batch]
            try:
                out = self.pipeline.plan_batch([j.request for j in chunk])
            except EngineError as exc:
                self._done += [(j, f"engine: {exc}") for j in chunk]
                continue
            for job, w in zip(chunk, out, strict=True):
                self.sizes.add(len(chunk))
                self._done.append((job, w.copy() if isinstance(w, np.ndarray) else str(w)))

    def poll(self) -> list[tuple[Job, Result]]:
        done, self._done = self._done, []
        return done

    def close(self) -> None:
        pass
