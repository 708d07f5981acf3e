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

# Per precision: max |onnx - pytorch fp32| for outputs in action units (rad) -- a planner's
# actions, a follower's residual -- and max |onnx - pytorch| / max |pytorch| for `features`
# and `velocity` outputs, whose scale is the model's own (KV features, a flow's velocity),
# not radians. fp32 is the 1e-4. fp16 carries ~3 significant digits through a few
# transformer layers. int8 moves the planner's waypoints by up to a few hundredths of a
# radian (well inside one chunk step of a slow arm) and the follower's residual (itself
# bounded by 0.05 rad) by a few thousandths. Weight-only int8 (int8w) quantizes weights in
# blocks of 32, and at accuracy level 4 each activation block on the fly: between fp16 and
# int8 QDQ (the 0.59 B-parameter prefix of `make verify-vla`, 42 decoder layers: 3.9 % on
# its KV features, 3e-5 rad on the chunk); int4w, coarser.
TOLERANCES: dict[str, dict[str, float]] = {
    "fp32": {"planner": 1e-4, "follower": 1e-4, "relative": 1e-4},
    "fp16": {"planner": 1e-2, "follower": 1e-3, "relative": 2e-2},
    "int8": {"planner": 6e-2, "follower": 5e-3, "relative": 1e-1},
    "int8w": {"planner": 2e-2, "follower": 2e-3, "relative": 6e-2},
    "int4w": {"planner": 6e-2, "follower": 5e-3, "relative": 1.5e-1},
}
RELATIVE_ROLES = ("features", "velocity")

# output name -> ("abs" | "rel", tolerance)
Judges = dict[str, tuple[str, float]]


def judges(roles: dict[str, str], max_abs: float, max_rel: float | None) -> Judges:
    """How each output of a model is judged, by its role; `max_rel` None (a bundle from
    before relative tolerances): every output in absolute terms."""
    return {name: ("rel", max_rel) if role in RELATIVE_ROLES and max_rel is not None
            else ("abs", max_abs) for name, role in roles.items()}


@dataclass
class ParityResult:
    model: str
    output: str
    judged: str  # "abs": max_abs in output units (rad); "rel": max_rel
    samples: int
    max_abs: float
    max_rel: float  # max_abs relative to the largest |reference| value of this output
    tolerance: float
    latency_ms_p50: float
    latency_ms_p99: float

    @property
    def ok(self) -> bool:
        # NaN compares False: a non-finite output fails.
        return bool((self.max_abs if self.judged == "abs" else self.max_rel) <= self.tolerance)


def measure(model: str, engine: Engine, inputs: dict[str, np.ndarray],
            reference: dict[str, np.ndarray], judge: Judges, repeat: int = 5
            ) -> list[ParityResult]:
    """Run every sample through `engine` (as many per call as its batch); compare each output
    with `reference` [N, ...] as `judge` says."""
    n = len(next(iter(reference.values())))
    batch = batch_of(engine.input_specs)
    max_abs = dict.fromkeys(reference, 0.0)
    scale = dict.fromkeys(reference, 0.0)
    times: list[float] = []
    for i, (feeds, real) in zip(range(0, n, batch), batches(inputs, batch), strict=False):
        for _ in range(repeat):
            t0 = time.perf_counter()
            out = engine.run(feeds)
            times.append(time.perf_counter() - t0)
        for name, ref in reference.items():
            got, want = out[name][:real].astype(np.float64), ref[i:i + real]
            diff = np.abs(got - want)
            worst = float(diff.max()) if np.isfinite(diff).all() else np.inf
            max_abs[name] = max(max_abs[name], worst)
            scale[name] = max(scale[name], float(np.abs(want).max()))
    ms = np.asarray(times) * 1e3
    p50, p99 = float(np.percentile(ms, 50)), float(np.percentile(ms, 99))
    return [ParityResult(model=model, output=name, judged=judge[name][0], samples=n,
                         max_abs=max_abs[name],
                         max_rel=max_abs[name] / scale[name] if scale[name] > 0
                         else max_abs[name], tolerance=judge[name][1],
                         latency_ms_p50=p50, latency_ms_p99=p99) for name in reference]


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
             f"{'model':<16} {'output':<12} {'n':>3} {'max abs':>10} {'max rel':>10} "
             f"{'tolerance':>14} {'p50 ms':>8} {'p99 ms':>8}  result"]
    for r in results:
        tol = f"{r.tolerance:.3g} {'rad' if r.judged == 'abs' else 'rel'}"
        lines.append(f"{r.model:<16} {r.output:<12} {r.samples:>3} {r.max_abs:>10.3g} "
                     f"{r.max_rel:>10.3g} {tol:>14} {r.latency_ms_p50:>8.3f} "
                     f"{r.latency_ms_p99:>8.3f}  {'ok' if r.ok else 'FAIL'}")
    return "\n".join(lines)
