"""The planner's latency benched on this host (`duet config validate --bench N`): the bundle's
pipeline as the robot's config sets it up, on a synthetic observation (grey frames, the arm
at mid-range), N plans after one warm-up. What it measures is the model's whole call; the
planner process adds waiting for inputs and publishing (a millisecond or two)."""

from __future__ import annotations

import time

import numpy as np

from runtime.config import DuetConfig
from runtime.model.bundle import Bundle
from runtime.model.timing import Latency
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PlannerPipeline


def synthetic_observation(cfg: DuetConfig) -> Observation:
    """Mid-grey frames of each configured camera's size, the joints at mid-range, still."""
    frames = {name: np.full((cam.height, cam.width, 3), 128, dtype=np.uint8)
              for name, cam in cfg.planner.cameras.items()}
    lim = cfg.robot.limits
    q = (np.asarray(lim.position_min) + np.asarray(lim.position_max)) / 2
    history = StateHistory(len(cfg.robot.joints))
    now = time.monotonic_ns()
    for k in range(64, -1, -1):  # a second of states: any history a model reads
        history.add(now - k * 16_000_000, q=q, dq=np.zeros_like(q))
    return Observation(frames, history, now, cfg.planner.instruction)


def bench_latency(bundle: Bundle, cfg: DuetConfig, plans: int,
                  pipeline: PlannerPipeline | None = None) -> Latency:
    """`pipeline`: one made from `bundle` and `cfg` already (its stage times then hold these
    plans: bench/verify_vla.py prints them)."""
    pipeline = pipeline or PlannerPipeline.configured(bundle, cfg)
    obs = synthetic_observation(cfg)
    pipeline.plan(obs)  # warm-up: first-call allocations and kernel selection
    ms = []
    for _ in range(plans):
        t0 = time.perf_counter_ns()
        pipeline.plan(obs)
        ms.append((time.perf_counter_ns() - t0) / 1e6)
    values = np.asarray(ms)
    return Latency(float(np.percentile(values, 50)), float(np.percentile(values, 99)),
                   f"benched here over {plans} plans")
