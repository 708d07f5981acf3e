"""Beyond one GPU host: the planner server hands its observations to a Ray Serve deployment
(`planner.serve.engine: ray`).

The server stays the robots' only door (CURVE, the allow-list, rate limits, routing by
identity); behind it each observation is one call on the deployment's handle. `@serve.batch`
gathers the calls that reach a replica together into one list, which the replica's pipeline
plans in engine calls of the bundle's batch; Serve spreads calls over `replicas` (on as
many GPU hosts as the Ray cluster has) and restarts a replica that dies. The front keeps up
to two batches per replica in flight, each call waited on by a worker thread, so receiving
never waits for an engine.

Ray's own transport is not authenticated: the Ray cluster belongs on the GPU hosts' private
network, as Ray's documentation requires; robots never reach it. Ray is the `serve` extra,
never a robot dependency.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import numpy as np
import ray
from ray import serve

from runtime.config import DuetConfig
from runtime.ipc.stats import Ring
from runtime.model.bundle import load_bundle
from runtime.planner.pipeline import PlannerPipeline, PlanRequest
from runtime.remote.batching import Job, Result

log = logging.getLogger("duet.planner.ray")

APP = "duet-planner"


@serve.deployment
class PlannerReplica:
    """One replica: the bundle's pipeline, fed by `@serve.batch`."""

    def __init__(self, config: dict[str, Any], max_batch: int, wait_s: float) -> None:
        cfg = DuetConfig.model_validate(config)
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
        self.pipeline = PlannerPipeline.configured(bundle, cfg)
        self.plan.set_max_batch_size(max_batch)  # type: ignore[attr-defined]
        self.plan.set_batch_wait_timeout_s(wait_s)  # type: ignore[attr-defined]

    @serve.batch
    async def plan(self, requests: list[PlanRequest]) -> list[tuple[Result, int]]:
        """Each request's waypoints (or why none), and how many shared its engine call."""
        out: list[tuple[Result, int]] = []
        step = self.pipeline.batch
        for start in range(0, len(requests), step):
            chunk = requests[start:start + step]
            try:
                results = self.pipeline.plan_batch(chunk)
            except Exception as exc:  # an engine failure answers these requests, no more
                out += [(f"engine: {exc}", len(chunk))] * len(chunk)
                continue
            out += [(r.copy() if isinstance(r, np.ndarray) else str(r), len(chunk))
                    for r in results]
        return out


class RayBackend:
    """A `Backend` (runtime/remote/batching.py) on a Ray Serve deployment."""

    def __init__(self, cfg: DuetConfig, batch: int) -> None:
        assert cfg.planner.serve is not None
        rc = cfg.planner.serve.ray
        self._started = not ray.is_initialized()
        if self._started:
            ray.init(address=rc.address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        self.batch = batch
        app = PlannerReplica.options(  # type: ignore[attr-defined]
            num_replicas=rc.replicas,
            ray_actor_options={"num_cpus": rc.cpus_per_replica, "num_gpus": rc.gpus_per_replica},
            max_ongoing_requests=2 * batch,
        ).bind(cfg.model_dump(mode="json"), batch, rc.batch_wait_ms / 1e3)
        self.handle = serve.run(app, name=APP, route_prefix=None)
        self.max_in_flight = 2 * batch * rc.replicas
        self._pool = concurrent.futures.ThreadPoolExecutor(self.max_in_flight,
                                                           thread_name_prefix="duet-ray")
        self._in_flight: dict[concurrent.futures.Future[tuple[Result, int]], Job] = {}
        self.sizes = Ring(1 << 14)  # per observation: how many shared its engine call
        log.info("Ray Serve deployment %s: %d replica(s), batch %d", APP, rc.replicas, batch)

    def _call(self, request: PlanRequest) -> tuple[Result, int]:
        result: tuple[Result, int] = self.handle.plan.remote(request).result()
        return result

    def capacity(self) -> int:
        return self.max_in_flight - len(self._in_flight)

    def in_flight(self) -> int:
        return len(self._in_flight)

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self._in_flight[self._pool.submit(self._call, job.request)] = job

    def poll(self) -> list[tuple[Job, Result]]:
        done = [f for f in self._in_flight if f.done()]
        out: list[tuple[Job, Result]] = []
        for future in done:
            job = self._in_flight.pop(future)
            try:
                result, size = future.result()
            except Exception as exc:  # a replica that died, a Serve error: this job fails
                out.append((job, f"ray: {exc.__class__.__name__}: {exc}"[:300]))
                continue
            self.sizes.add(size)
            out.append((job, result))
        return out

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        serve.delete(APP)
        if self._started:
            serve.shutdown()
            ray.shutdown()
