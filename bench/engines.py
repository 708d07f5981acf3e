"""Per-call cost of the runtime's ONNX Runtime engine (I/O binding into preallocated buffers)
against plain `InferenceSession.run`, for the follower (500 Hz path) and the planner.

    .venv/bin/python bench/engines.py [--bundle DIR ...] [--calls 5000]

Without --bundle, exports the (untrained) reference policy models at fp32 and int8 into a
temporary folder first (needs the export extra: torch, onnx). Prints one table: median, p99
and mean per call in microseconds, both methods measured in the same run, same inputs.
"""

from __future__ import annotations

import argparse
import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from runtime.model.bundle import Bundle, TensorSpec, load_bundle
from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine, session_options


def _feeds(specs: list[TensorSpec], rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {s.name: (rng.normal(0, 0.5, s.shape).astype(np.float32) if s.dtype == "float32"
                     else rng.integers(0, 30, s.shape).astype(s.dtype)) for s in specs}


def _time(call: Callable[[dict[str, np.ndarray]], Any], feeds: dict[str, np.ndarray],
          calls: int) -> np.ndarray:
    for _ in range(min(200, calls)):  # warm-up: first calls allocate arenas
        call(feeds)
    out = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter_ns()
        call(feeds)
        out[i] = time.perf_counter_ns() - t0
    return out / 1e3


def bench_bundle(bundle: Bundle, calls: int) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    rng = np.random.default_rng(0)
    for model, spec in bundle.model_specs().items():
        path = bundle.path / spec.file
        n = calls if model == "follower" else max(50, calls // 20)
        engine = OnnxRuntimeEngine(path)
        session = ort.InferenceSession(str(path), sess_options=session_options(1),
                                       providers=["CPUExecutionProvider"])
        feeds = _feeds(engine.input_specs, rng)
        # Interleave the two methods' runs so drift and neighbours hit both alike.
        plain_run = functools.partial(session.run, None)
        a, b = [], []
        for _ in range(5):
            a.append(_time(plain_run, feeds, n // 5))
            b.append(_time(engine.run, feeds, n // 5))
        for name, us in (("session.run", np.concatenate(a)), ("engine.run (iobinding)",
                                                              np.concatenate(b))):
            rows.append((model, spec.precision, name, f"{np.median(us):.1f}",
                         f"{np.percentile(us, 99):.1f}", f"{us.mean():.1f}", str(len(us))))
    return rows


def _reference_bundles(root: Path) -> list[Path]:
    import torch

    from export.pipeline import ExportOptions, export_bundle, load_contract
    from policy.models import Follower, Planner
    from policy.reference import CONTRACT
    from runtime.model.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer()
    rng = np.random.default_rng(0)
    n = 40
    obs = root / "obs.npz"
    arrays: dict[str, Any] = {
        "planner/image": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
        "planner/tokens": rng.integers(0, tok.vocab_size, (n, 16)),
        "planner/q": rng.uniform(-1, 1, (n, 6)).astype(np.float32),
        "follower/ref": rng.uniform(-1, 1, (n, 8, 6)).astype(np.float32),
        "follower/q": rng.uniform(-1, 1, (n, 6)).astype(np.float32),
        "follower/dq": rng.normal(0, 1, (n, 6)).astype(np.float32)}
    np.savez(obs, **arrays)
    modules = {"planner": Planner(tok.vocab_size).eval(), "follower": Follower().eval()}
    tok.save(root / "tokenizer.json")
    out = []
    for precision in ("fp32", "int8"):
        opts = ExportOptions(precision=precision, calib=32, calib_data=obs)
        out.append(export_bundle(load_contract(CONTRACT), dict(modules), root / precision, opts,
                                 assets=root))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, action="append", help="bundle folder (repeatable)")
    ap.add_argument("--calls", type=int, default=5000, help="follower calls per method")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = args.bundle or _reference_bundles(Path(tmp))
        rows = []
        for p in paths:
            rows += bench_bundle(load_bundle(p), args.calls)
    head = ("model", "precision", "method", "p50 us", "p99 us", "mean us", "calls")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    print(f"ONNX Runtime {ort.__version__}, 1 intra-op thread, CPU")
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(r, widths, strict=True))))


if __name__ == "__main__":
    main()
