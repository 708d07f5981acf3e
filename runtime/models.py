"""A verified bundle's models as the runtime uses them: the follower's residual model (and,
from the contract, the planner pipeline). The only place that turns a bundle's I/O
description into engine calls."""

from __future__ import annotations

import numpy as np

from runtime.bundle import Bundle
from runtime.config import DuetConfig
from runtime.engines import make_engine
from runtime.residual import EngineResidual


def residual_model(bundle: Bundle, cfg: DuetConfig) -> EngineResidual | None:
    m = bundle.manifest
    engine = make_engine(m.models.follower, bundle, cfg.bundle.engine)
    n = len(cfg.robot.joints)
    return EngineResidual(engine, ref="ref", q="q", dq="dq", out="residual",
                          lookahead=m.lookahead.steps, lookahead_dt=m.lookahead.dt_s,
                          joints=np.arange(n), n_robot=n)
