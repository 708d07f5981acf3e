"""Per-step latency of the loop stage (autoregressive tokens over a fixed-size KV buffer) vs
the same decoding unrolled into one graph, on this CPU, 1 thread.

The planner is the tiny autoregressive one of tests/byo_policies.py (2 layers, a KV buffer
[1, 2, 2, 29, 16], 25 steps a plan: 24 action tokens and the end token), exported by
`export_bundle` like any bundle. Three ways to decode the same 25 steps:

- loop stage: the runtime's pipeline (`PlannerPipeline`, decode stage), carried buffers
  swapped by IOBinding inside the engine; per step as `planner.stage_ms["decode.step"]`;
- loop, copies: the same step graph, the KV buffer copied from output to input through numpy
  each step (what a loop without carried bindings does);
- unrolled: one graph with the 25 steps traced in (what a contract without a loop stage
  forces), per call / 25.

    .venv/bin/python -m bench.loop_stage [--plans 200]

Prints p50 and p99 per step in ms and each one's ratio to the loop stage in the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plans", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(ROOT / "tests"))
    import byo_policies as ar  # type: ignore[import-not-found]
    from sim_arm import sim_config  # type: ignore[import-not-found]

    from export.onnx_export import export_onnx
    from runtime.model.bundle import load_bundle
    from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine
    from runtime.planner.latency import synthetic_observation
    from runtime.planner.pipeline import PlannerPipeline

    steps = ar.AR_TOKENS + 1
    with tempfile.TemporaryDirectory() as tmp:
        bundle = load_bundle(ar.ar_bundle(Path(tmp) / "ar"))
        cfg = sim_config()
        pipe = PlannerPipeline.configured(bundle, cfg)
        obs = synthetic_observation(cfg)
        for _ in range(args.plans):
            pipe.plan(obs)
        loop = pipe.stages[-1].loop
        assert loop is not None and int(np.median(loop.steps.values())) == steps
        loop_ms = loop.step_ms.values()

        # the same step graph, its KV buffer copied through numpy between steps
        step = OnnxRuntimeEngine(bundle.path / "decode.onnx")
        kv0 = pipe._outputs["prefill.kv0"]  # what the prefill gave on `obs`
        feeds = step.inputs
        copy_ms = np.empty(args.plans * steps)
        i = 0
        for _ in range(args.plans):
            np.copyto(feeds["kv_in"], kv0)
            feeds["tok_in"].fill(ar.AR_BOS)
            for k in range(steps):
                t0 = time.perf_counter_ns()
                feeds["pos"].fill(1 + k)
                out = step.run(feeds)
                np.copyto(feeds["kv_in"], out["kv_out"])
                np.copyto(feeds["tok_in"], out["token"])
                copy_ms[i] = (time.perf_counter_ns() - t0) / 1e6
                i += 1

        class Unrolled(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.step = ar.ARDecodeStep().eval()

            def forward(self, kv: torch.Tensor) -> torch.Tensor:
                tok = torch.full((1, 1), ar.AR_BOS, dtype=torch.int64)
                tokens = []
                for k in range(steps):
                    tok, kv = self.step(kv, tok, torch.tensor([1 + k]))
                    tokens.append(tok)
                return torch.cat(tokens, 1)

        path = Path(tmp) / "unrolled.onnx"
        with contextlib.redirect_stdout(io.StringIO()):
            export_onnx(Unrolled(), (torch.from_numpy(kv0.copy()),), ["kv"], ["tokens"], path,
                        "unrolled")
        unrolled = OnnxRuntimeEngine(path)
        np.copyto(unrolled.inputs["kv"], kv0)
        got = unrolled.run(unrolled.inputs)["tokens"][0, :ar.AR_TOKENS]
        assert got.tolist() == loop.tokens[0, :ar.AR_TOKENS].tolist(), "not the same decoding"
        whole = np.empty(args.plans)
        for j in range(args.plans):
            t0 = time.perf_counter_ns()
            unrolled.run(unrolled.inputs)
            whole[j] = (time.perf_counter_ns() - t0) / 1e6
        unrolled_ms = whole / steps

    base = float(np.median(loop_ms))
    print(f"per decoding step, {steps} steps a plan, {args.plans} plans, 1 thread (ms)")
    print(f"{'way':<24}{'p50':>9}{'p99':>9}{'p50 / loop stage':>18}")
    for name, ms in (("loop stage (IOBinding)", loop_ms), ("loop, KV copies", copy_ms),
                     ("unrolled graph", unrolled_ms)):
        p50, p99 = np.percentile(ms, [50, 99])
        print(f"{name:<24}{p50:>9.3f}{p99:>9.3f}{p50 / base:>18.2f}")


if __name__ == "__main__":
    main()
