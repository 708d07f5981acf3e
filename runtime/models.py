"""A verified bundle's models as the runtime runs them: the planner pipeline and the follower's
residual model, both built from the contract (the only place that turns a bundle's I/O
description into engine calls)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.bundle import Bundle
from runtime.contract import FollowerProprio
from runtime.engines import EngineKind, ProviderArg, make_engine
from runtime.residual import EngineResidual


def residual_model(bundle: Bundle, robot_joints: list[str], engine: EngineKind = "onnxruntime",
                   *, providers: Sequence[ProviderArg] | None = None,
                   cache_dir: str | Path | None = None) -> EngineResidual | None:
    """The follower network behind `tracking.ResidualModel`, or None (no follower model)."""
    spec = bundle.follower_spec()
    f = bundle.contract.follower
    if spec is None or f is None:
        return None
    index = {j: k for k, j in enumerate(robot_joints)}
    names = {i.field: i.name for i in f.inputs if isinstance(i, FollowerProprio)}
    ref = f.reference
    eng = make_engine(spec, bundle, engine, providers=providers, cache_dir=cache_dir)
    return EngineResidual(eng, ref=ref.name,
                          q=names.get("q"), dq=names.get("dq"), out=f.output.name,
                          lookahead=ref.steps, lookahead_dt=ref.dt_s,
                          joints=np.array([index[j] for j in bundle.contract.follower_joints]),
                          n_robot=len(robot_joints))
