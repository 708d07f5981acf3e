"""Parity: do the bundle's ONNX models reproduce the fp32 PyTorch outputs?

At export the reference outputs come from PyTorch; they are stored with their inputs in the
bundle's parity.npz, so `duet export check` reruns the same comparison on the robot (ONNX
Runtime or TensorRT, no torch) and prints max abs / relative error and latency.
Robot-side code: numpy + the runtime engines only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.calibration import batch_of, batches
from runtime.model.engines import Engine

# Max |onnx - pytorch fp32| in output units (rad), per precision and model. fp32 is the issue's
# 1e-4. fp16 carries ~3 significant digits through a few transformer layers. int8 moves the
# planner's waypoints by up to a few hundredths of a radian (well inside one chunk step of
# a slow arm) and the follower's residual (itself bounded by 0.05 rad) by a few thousandths.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"planner": 1e-4, "follower": 1e-4},
    "fp16": {"planner": 1e-2, "follower": 1e-3},
    "int8": {"planner": 6e-2, "follower": 5e-3},
}


@dataclass
class ParityResult:
    model: str
    samples: int
    max_abs: float
    max_rel: float  # max_abs relative to the largest |reference| value
    tolerance: float
    latency_ms_p50: float
    latency_ms_p99: float

    @property
    def ok(self) -> bool:
        # NaN compares False: a non-finite output fails.
        return bool(self.max_abs <= self.tolerance)


def measure(model: str, engine: Engine, inputs: dict[str, np.ndarray],
            reference: dict[str, np.ndarray], tolerance: float, repeat: int = 5) -> ParityResult:
    """Run every sample through `engine` (as many per call as its batch); compare with
    `reference` [N, ...]."""
    n = len(next(iter(reference.values())))
    batch = batch_of(engine.input_specs)
    max_abs, scale = 0.0, 0.0
    times: list[float] = []
    for i, (feeds, real) in zip(range(0, n, batch), batches(inputs, batch), strict=False):
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = engine.run(feeds)
            times.append(time.perf_counter() - t0)
        for name, ref in reference.items():
            got, want = out[name][:real].astype(np.float64), ref[i:i + real]
            diff = np.abs(got - want)
            max_abs = max(max_abs, float(diff.max()) if np.isfinite(diff).all() else np.inf)
            scale = max(scale, float(np.abs(want).max()))
    ms = np.asarray(times) * 1e3
    return ParityResult(model=model, samples=n, max_abs=max_abs,
                        max_rel=max_abs / scale if scale > 0 else max_abs, tolerance=tolerance,
                        latency_ms_p50=float(np.percentile(ms, 50)),
                        latency_ms_p99=float(np.percentile(ms, 99)))


def save_parity(path: Path, data: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]
                ) -> None:
    """model -> (inputs, reference outputs), stored as `<model>/in/<name>`, `<model>/out/<name>`."""
    arrays: dict[str, Any] = {}
    for model, (inputs, outputs) in data.items():
        arrays.update({f"{model}/in/{k}": v for k, v in inputs.items()})
        arrays.update({f"{model}/out/{k}": v for k, v in outputs.items()})
    with path.open("wb") as f:
        np.savez_compressed(f, **arrays)


def load_parity(path: Path) -> dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    out: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
    with np.load(path) as data:
        for key in data.files:
            model, kind, name = key.split("/", 2)
            inputs, outputs = out.setdefault(model, ({}, {}))
            (inputs if kind == "in" else outputs)[name] = data[key]
    return out


def format_table(results: list[ParityResult], title: str) -> str:
    lines = [title,
             f"{'model':<14} {'n':>3} {'max abs':>10} {'max rel':>10} {'tolerance':>10} "
             f"{'p50 ms':>8} {'p99 ms':>8}  result"]
    for r in results:
        lines.append(f"{r.model:<14} {r.samples:>3} {r.max_abs:>10.3g} {r.max_rel:>10.3g} "
                     f"{r.tolerance:>10.3g} {r.latency_ms_p50:>8.3f} {r.latency_ms_p99:>8.3f}  "
                     f"{'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
