"""Latency of the FACT decoder run K times (the runtime's Euler loop) on this CPU: the
bundle's decoder graph in ONNX Runtime fp32 and int8 (QDQ, `export.precision.to_int8`,
calibrated on the bundle's parity codes with Gaussian x_t), through the runtime's engine
(1 thread, I/O binding), next to PyTorch eager (1 thread) on the source checkpoint; and the
code predictor (stage 1) once.

    .venv/bin/python bench/fact_decoder.py [--bundle bundles/fact] [--checkpoints runs/fact]

Prints p50 and p99 per whole decode (K stage-2 calls plus the x update) in ms, the ratio to
ORT fp32 in the same run, int8's chunk deviation from fp32 (same codes and noise, rad after
de-normalisation), and the largest K whose p99 stays under --budget-ms per engine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from export.parity import load_parity
from export.precision import to_int8
from policy.fact import FactDecoderStage, FactTokenizer
from policy.models import load_checkpoint
from runtime.model.bundle import load_bundle
from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine

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
    feeds = engine.inputs  # the runtime's way: preallocated feeds, filled in place
    np.copyto(feeds["codes"], codes)

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


def _calibration(codes: np.ndarray, chunk: tuple[int, int], n: int, seed: int
                 ) -> dict[str, np.ndarray]:
    """Real codes, x_t ~ N(0, 1) and t ~ U(0, 1): where the Euler loop evaluates."""
    rng = np.random.default_rng(seed)
    return {"codes": codes[rng.integers(0, len(codes), n)].astype(np.float32),
            "x_t": rng.standard_normal((n, *chunk), dtype=np.float32),
            "t": rng.uniform(0.0, 1.0, (n,)).astype(np.float32)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, default=Path("bundles/fact"))
    ap.add_argument("--checkpoints", type=Path, default=Path("runs/fact"),
                    help="the `duet train-fact` folder (fact_tokenizer.pt) for PyTorch eager")
    ap.add_argument("--calls", type=int, default=300, help="decodes per K and engine")
    ap.add_argument("--budget-ms", type=float, default=10.0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    bundle = load_bundle(args.bundle)
    stages = {s.name: s for s in bundle.contract.planner.stages}
    a = bundle.contract.planner.actions
    std = np.asarray(a.std or [1.0] * len(a.joints))  # int8's deviation, in rad
    tk, _ = load_checkpoint(args.checkpoints / "fact_tokenizer.pt")
    assert isinstance(tk, FactTokenizer)
    stage = FactDecoderStage(tk).eval()
    parity = load_parity(bundle.path / "parity.npz")
    real_codes = parity["decoder"][0]["codes"]
    codes = real_codes[:1].astype(np.float32)
    noise = np.random.default_rng(0).standard_normal((1, a.horizon, len(a.joints)),
                                                     dtype=np.float32)
    codes_t, noise_t = torch.from_numpy(codes), torch.from_numpy(noise)
    dec_fp32 = bundle.path / stages["decoder"].file
    rows: list[tuple[str, ...]] = []
    p99: dict[tuple[str, int], float] = {}
    decoder: dict[str, dict[int, dict[str, float]]] = {}
    int8_dev: dict[int, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dec_int8 = Path(tmp) / "decoder.int8.onnx"
        to_int8(dec_fp32, dec_int8, _calibration(real_codes, (a.horizon, len(a.joints)), 128, 1))
        engines = {"ORT fp32": OnnxRuntimeEngine(dec_fp32, threads=1),
                   "ORT int8": OnnxRuntimeEngine(dec_int8, threads=1)}
        for k in STEPS:
            times: dict[str, list[np.ndarray]] = {name: [] for name in [*engines, "PyTorch eager"]}
            for _ in range(3):  # interleaved, so drift and neighbours hit all alike
                for name, eng in engines.items():
                    times[name].append(_time_ms(_ort_decode(eng, codes, noise, k),
                                                args.calls // 3))
                times["PyTorch eager"].append(_time_ms(_eager_decode(stage, codes_t, noise_t, k),
                                                       args.calls // 3))
            base = float(np.median(np.concatenate(times["ORT fp32"])))
            for name, parts in times.items():
                ms = np.concatenate(parts)
                rows.append((f"decoder x{k}", name, f"{np.median(ms):.3f}",
                             f"{np.percentile(ms, 99):.3f}", f"{np.median(ms) / base:.2f}"))
                p99[name, k] = float(np.percentile(ms, 99))
                decoder.setdefault(name, {})[k] = {"p50_ms": float(np.median(ms)),
                                                   "p99_ms": p99[name, k]}
            dev = []
            for c in real_codes:
                outs = [_ort_decode(e, c[None].astype(np.float32), noise, k)().copy()
                        for e in engines.values()]
                dev.append(np.abs((outs[1] - outs[0]) * std).max())
            int8_dev[k] = float(np.max(dev))
        codes_engine = OnnxRuntimeEngine(bundle.path / stages["codes"].file, threads=1)
        feeds = codes_engine.inputs
        for name, value in parity["codes"][0].items():
            np.copyto(feeds[name], value[:1])
        ms = _time_ms(lambda: codes_engine.run(feeds), max(30, args.calls // 5))
        rows.append(("codes (stage 1)", "ORT fp32", f"{np.median(ms):.3f}",
                     f"{np.percentile(ms, 99):.3f}", "—"))
        codes_ms = {"p50_ms": float(np.median(ms)), "p99_ms": float(np.percentile(ms, 99))}
    print(f"FACT L={tk.code_len} B={tk.code_bits}, decoder hidden {tk.kwargs['hidden']}; "
          f"ONNX Runtime {ort.__version__}, torch {torch.__version__}, 1 thread, CPU; "
          f"{args.calls} decodes per cell")
    head = ("graph", "engine", "p50 ms", "p99 ms", "p50 / ORT fp32")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))))
    print("int8 chunk deviation from fp32 (max over parity codes, rad): "
          + ", ".join(f"K={k}: {v:.4f}" for k, v in int8_dev.items()))
    fits: dict[str, int | None] = {}
    for name in ("ORT fp32", "ORT int8", "PyTorch eager"):
        fit = [k for k in STEPS if all(p99[name, j] < args.budget_ms for j in STEPS if j <= k)]
        fits[name] = fit[-1] if fit else None
        print(f"{name}: largest K with decoder p99 < {args.budget_ms:g} ms: "
              f"{fit[-1] if fit else 'none'} (of {list(STEPS)})")
    if args.json:
        report = {"decoder": decoder, "int8_chunk_dev_rad": int8_dev, "codes_ms": codes_ms,
                  "largest_k_under_budget": fits, "budget_ms": args.budget_ms,
                  "calls": args.calls}
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
