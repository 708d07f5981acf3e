"""Parity of the whole planner: its final action chunk, every stage at the bundle's precision,
against the same with every stage in fp32, on the held-out observations, in action units
(radians, after de-normalisation); and once per reduced stage with only that stage reduced, so
the report says which stage costs the error.

Stages chain as on the robot: a stage reads its `stage` inputs from the chain's own earlier
outputs, and a flow stage is integrated with the runtime's Euler steps from the same seeded
noise in every variant. The fp32 chain stands for the source: each fp32 graph is within the
fp32 tolerance (1e-4) of its PyTorch module, checked per stage beside this.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from export.calibration import Samples, run_all
from runtime.model.contract import (
    CarryInput,
    Contract,
    FlowTimeInput,
    NoiseInput,
    PositionInput,
    Stage,
    StageInput,
)
from runtime.model.detokenizer import DetokenizeError, make_codec
from runtime.model.engines import Engine

FP32, BUNDLE = "all fp32", "bundle"


@dataclass
class ChunkResult:
    variant: str  # "bundle", or "only <stage>": that stage reduced, the others fp32
    max_rad: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(self.max_rad <= self.tolerance)


class ChunkParity:
    def __init__(self, contract: Contract, seed: int, assets: Path) -> None:
        """`assets`: where the contract's files are (a FAST detokenizer's tokenizer)."""
        self.contract, self.seed, self.assets = contract, seed, assets
        self.chains: dict[str, dict[str, np.ndarray]] = {FP32: {}, BUNDLE: {}}

    def fp32(self, stage: Stage, held_out: Samples, engine: Engine, reduced: bool) -> None:
        """Run `stage` in fp32 in every variant that has it so (`reduced`: the bundle has it
        in another precision, which `reduced_run` then runs)."""
        only = f"only {stage.name}"
        if reduced:
            self.chains[only] = dict(self.chains[FP32])
        for variant, chain in self.chains.items():
            if not reduced or variant not in (BUNDLE, only):
                chain.update(self._run(stage, engine, held_out, chain))

    def reduced(self, stage: Stage, held_out: Samples, engine: Engine) -> None:
        for variant in (BUNDLE, f"only {stage.name}"):
            self.chains[variant].update(self._run(stage, engine, held_out,
                                                  self.chains[variant]))

    def _run(self, stage: Stage, engine: Engine, held_out: Samples,
             chain: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feeds = dict(held_out)
        for i in stage.inputs:
            if isinstance(i, StageInput):
                feeds[i.name] = chain[i.source].astype(held_out[i.name].dtype)
        if stage.loop is not None:
            return {"chunk": self._decode(stage, engine, feeds, chain)}
        if stage.flow is None:
            out = run_all(engine, feeds)
            got = {f"{stage.name}.{k}": v for k, v in out.items()}
            actions = next((o.name for o in stage.outputs if o.role == "actions"), None)
            if actions is not None:
                got["chunk"] = out[actions]
            return got
        noise = next(i.name for i in stage.inputs if isinstance(i, NoiseInput))
        t = next(i.name for i in stage.inputs if isinstance(i, FlowTimeInput))
        velocity = next(o.name for o in stage.outputs if o.role == "velocity")
        rng = np.random.default_rng(self.seed)
        x = rng.standard_normal(held_out[noise].shape).astype(np.float32)
        h = (stage.flow.t_end - stage.flow.t_start) / stage.flow.steps
        for k in range(stage.flow.steps):
            feeds[noise] = x
            feeds[t] = np.full_like(held_out[t], stage.flow.t_start + k * h)
            x = x + h * run_all(engine, feeds)[velocity].astype(np.float32)
        return {"chunk": x}

    def _decode(self, stage: Stage, engine: Engine, feeds: Samples,
                chain: dict[str, np.ndarray]) -> np.ndarray:
        """A loop stage as the runtime decodes it (greedy, carried outputs fed back, stopped
        on the end token), one held-out observation at a time, then detokenized; NaN where
        the tokens make no chunk."""
        assert stage.loop is not None
        a = self.contract.planner.actions
        codec = make_codec(stage.loop.detokenizer, self.assets, a.horizon)
        token = next(o.name for o in stage.outputs if o.role == "token")
        carries = [i for i in stage.inputs if isinstance(i, CarryInput)]
        position = next((i for i in stage.inputs if isinstance(i, PositionInput)), None)
        n = len(next(iter(feeds.values())))
        chunks = np.full((n, a.horizon, len(a.joints)), np.nan)
        step = engine.inputs
        for row in range(n):
            for name, value in feeds.items():
                if name in step:
                    step[name][:] = value[row]
            for c in carries:
                step[c.name][:] = chain[c.source][row] if c.source is not None else c.fill
            tokens: list[int] = []
            for k in range(stage.loop.max_steps):
                if position is not None:
                    step[position.name].fill(position.start + k)
                out = engine.run(step)
                tok = int(out[token][0, 0])
                if tok == stage.loop.end_token:
                    break
                tokens.append(tok)
                for c in carries:
                    np.copyto(step[c.name], out[c.output])
            try:
                codec.decode(np.array(tokens, dtype=np.int64), chunks[row])
            except DetokenizeError:
                pass  # stays NaN: the comparison fails, naming the variant
        return chunks

    def results(self, tolerance: float) -> list[ChunkResult]:
        a = self.contract.planner.actions
        std = np.asarray(a.std if a.std is not None else [1.0] * len(a.joints))
        want = self.chains[FP32]["chunk"].astype(np.float64)
        out = []
        for variant, chain in self.chains.items():
            if variant == FP32:
                continue
            diff = np.abs(chain["chunk"].astype(np.float64) - want) * std
            worst = float(diff.max()) if np.isfinite(diff).all() else np.inf
            out.append(ChunkResult(variant, worst, tolerance))
        return out


def format_chunk(results: list[ChunkResult], samples: int) -> str:
    lines = [f"the planner's action chunk vs all stages fp32, {samples} held-out observations",
             f"{'variant':<24} {'max |error| rad':>16} {'tolerance':>10}  result"]
    lines += [f"{r.variant:<24} {r.max_rad:>16.3g} {r.tolerance:>10.3g}  "
              f"{'ok' if r.ok else 'FAIL'}" for r in results]
    return "\n".join(lines)
