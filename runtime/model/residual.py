"""A follower engine behind `tracking.ResidualModel`: the contract says which tensor is the
reference window, q and dq, which is the residual, and which robot joints the model drives;
this maps the core's arrays onto the engine's preallocated feeds (no allocation per call)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from runtime.model.bundle import Bundle
from runtime.model.contract import FollowerProprio
from runtime.model.engines import Engine, EngineKind, ProviderArg, make_engine


class EngineResidual:
    def __init__(self, engine: Engine, *, ref: str, q: str | None, dq: str | None, out: str,
                 lookahead: int, lookahead_dt: float, joints: np.ndarray, n_robot: int) -> None:
        """`joints`: robot joint index of each model joint (a model may drive a subset; the
        residual of the others stays zero)."""
        self.engine = engine
        self.lookahead, self.lookahead_dt = lookahead, lookahead_dt
        self._idx = np.asarray(joints, dtype=np.intp)
        d = self._idx.shape[0]
        self._ref: np.ndarray = np.zeros((1, lookahead, d), dtype=np.float32)
        self._q: np.ndarray = np.zeros((1, d), dtype=np.float32)
        self._dq: np.ndarray = np.zeros((1, d), dtype=np.float32)
        self._q0, self._dq0 = self._q[0], self._dq[0]
        self._feeds: dict[str, np.ndarray] = {ref: self._ref}
        if q is not None:
            self._feeds[q] = self._q
        if dq is not None:
            self._feeds[dq] = self._dq
        self._out_name = out
        self._all = d == n_robot and bool((self._idx == np.arange(n_robot)).all())
        self._window = np.zeros((lookahead, d))
        self._sel = np.zeros(d)
        self._residual = np.zeros(n_robot)

    def residual(self, ref: np.ndarray, q: np.ndarray, dq: np.ndarray) -> np.ndarray:
        if self._all:
            self._ref[0] = ref
            self._q0[:] = q
            self._dq0[:] = dq
            return self.engine.run(self._feeds)[self._out_name][0]
        np.take(ref, self._idx, axis=1, out=self._window)
        self._ref[0] = self._window
        np.take(q, self._idx, out=self._sel)
        self._q0[:] = self._sel
        np.take(dq, self._idx, out=self._sel)
        self._dq0[:] = self._sel
        out = self.engine.run(self._feeds)[self._out_name][0]
        self._residual[self._idx] = out
        return self._residual


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
    eng = make_engine(spec, bundle, engine, providers=providers, cache_dir=cache_dir,
                      interruptible=False)
    return EngineResidual(eng, ref=ref.name,
                          q=names.get("q"), dq=names.get("dq"), out=f.output.name,
                          lookahead=ref.steps, lookahead_dt=ref.dt_s,
                          joints=np.array([index[j] for j in bundle.contract.follower_joints]),
                          n_robot=len(robot_joints))
