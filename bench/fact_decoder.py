"""Latency of the FACT decoder run K times (the runtime's Euler loop) on this CPU:
ONNX Runtime fp32 through the runtime's engine (1 thread, I/O binding) next to PyTorch eager
(1 thread), for each K, and the stage-1 code predictor once.

    .venv/bin/python bench/fact_decoder.py [--checkpoints runs/fact] [--calls 300]

Without --checkpoints, untrained models of the default size (latency does not depend on the
weights). Prints median and p99 per whole decode (K stage-2 calls plus the x update) in ms,
the ORT/eager ratio, and the largest K whose p99 stays under --budget-ms.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from policy.fact import FactDecoderStage, FactTokenizer
from policy.fact_export import STAGE_IO, decoder_inputs, export_stage
from policy.fact_planner import FactPlanner
from policy.models import load_checkpoint
from runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from runtime.tokenizer import Tokenizer

STEPS = (1, 2, 4, 8, 16)


def _time_ms(call: Callable[[], object], calls: int) -> np.ndarray:
    for _ in range(min(20, calls)):
        call()
    out = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        call()
        out[i] = time.perf_counter_ns() - t0
    return out / 1e6


def _ort_decode(engine: OnnxRuntimeEngine, codes: np.ndarray, noise: np.ndarray, k: int
                ) -> Callable[[], np.ndarray]:
    feeds = {"codes": codes, "x_t": noise.copy(), "t": np.zeros(1, dtype=np.float32)}

    def run() -> np.ndarray:
        x = feeds["x_t"]
        np.copyto(x, noise)
        for i in range(k):
            feeds["t"][0] = i / k
            x += engine.run(feeds)["velocity"] * (1.0 / k)
        return x
    return run


def _eager_decode(stage: FactDecoderStage, codes: torch.Tensor, noise: torch.Tensor, k: int
                  ) -> Callable[[], torch.Tensor]:
    @torch.no_grad()
    def run() -> torch.Tensor:
        x = noise.clone()
        for i in range(k):
            x += stage(codes, x, torch.tensor([i / k])) * (1.0 / k)
        return x
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="folder with fact_tokenizer.pt and fact_planner.pt")
    ap.add_argument("--calls", type=int, default=300, help="decodes per K and engine")
    ap.add_argument("--budget-ms", type=float, default=10.0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    if args.checkpoints:
        tk, _ = load_checkpoint(args.checkpoints / "fact_tokenizer.pt")
        planner, _ = load_checkpoint(args.checkpoints / "fact_planner.pt")
        assert isinstance(tk, FactTokenizer) and isinstance(planner, FactPlanner)
    else:
        tk, planner = FactTokenizer().eval(), FactPlanner(Tokenizer().vocab_size).eval()
    stage = FactDecoderStage(tk).eval()
    codes_t, noise_t, _ = decoder_inputs(tk)
    codes, noise = codes_t.numpy(), noise_t.numpy()
    rows: list[tuple[str, ...]] = []
    p99: dict[tuple[str, int], float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dec_path, codes_path = Path(tmp) / "decoder.onnx", Path(tmp) / "codes.onnx"
        export_stage(stage, "decoder", decoder_inputs(tk), dec_path)
        export_stage(planner, "codes", planner.example_inputs(), codes_path)
        engine = OnnxRuntimeEngine(dec_path, threads=1)
        for k in STEPS:
            # interleave the two so drift and neighbours hit both alike
            ort_ms, eager_ms = [], []
            for _ in range(3):
                ort_ms.append(_time_ms(_ort_decode(engine, codes, noise, k), args.calls // 3))
                eager_ms.append(_time_ms(_eager_decode(stage, codes_t, noise_t, k),
                                         args.calls // 3))
            o, e = np.concatenate(ort_ms), np.concatenate(eager_ms)
            for name, ms in (("ORT fp32", o), ("PyTorch eager", e)):
                rows.append((f"decoder x{k}", name, f"{np.median(ms):.3f}",
                             f"{np.percentile(ms, 99):.3f}",
                             f"{np.median(ms) / np.median(o):.2f}"))
                p99[name, k] = float(np.percentile(ms, 99))
        codes_engine = OnnxRuntimeEngine(codes_path, threads=1)
        inputs = planner.example_inputs()
        feeds = dict(zip(STAGE_IO["codes"][0], (x.numpy() for x in inputs), strict=True))
        ms = _time_ms(lambda: codes_engine.run(feeds), max(30, args.calls // 5))
        with torch.no_grad():
            eager = _time_ms(lambda: planner(*inputs), max(30, args.calls // 5))
        rows.append(("codes (stage 1)", "ORT fp32", f"{np.median(ms):.3f}",
                     f"{np.percentile(ms, 99):.3f}", "1.00"))
        rows.append(("codes (stage 1)", "PyTorch eager", f"{np.median(eager):.3f}",
                     f"{np.percentile(eager, 99):.3f}", f"{np.median(eager) / np.median(ms):.2f}"))
    print(f"FACT L={tk.code_len} B={tk.code_bits}, decoder hidden {tk.kwargs['hidden']}; "
          f"ONNX Runtime {ort.__version__} and torch {torch.__version__}, 1 thread, CPU")
    head = ("graph", "engine", "p50 ms", "p99 ms", "p50 / ORT")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))))
    for name in ("ORT fp32", "PyTorch eager"):
        fit = [k for k in STEPS if all(p99[name, j] < args.budget_ms for j in STEPS if j <= k)]
        print(f"{name}: largest K with decoder p99 < {args.budget_ms:g} ms: "
              f"{fit[-1] if fit else 'none'} (of {list(STEPS)})")


if __name__ == "__main__":
    main()
