"""Observations for INT8 calibration and parity checks, keyed by model input name.

Preferred source: an .npz of recorded observations (`duet train` writes one from the sim:
the distribution the robot sees), keys `<model>/<input>`. When none is given, observations
are synthesised from the contract's roles (`synth_inputs`). numpy only: `duet export check`
runs on the robot, which has no onnx (onnxruntime.quantization imports it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from runtime.model.bundle_files import TensorSpec
from runtime.model.engines import Engine

Samples = dict[str, np.ndarray]  # input name -> [N, *shape-without-batch]


class CalibrationError(ValueError):
    """Calibration data that does not fit the model's inputs."""


def load_npz(path: Path, model: str, specs: list[TensorSpec]) -> Samples:
    """Arrays for `model` from an .npz: key `<model>/<input>` (or `<model>_<input>`, or
    `<model>/in/<input>` as in a parity file)."""
    with np.load(path) as data:
        out: Samples = {}
        for spec in specs:
            for key in (f"{model}/{spec.name}", f"{model}_{spec.name}",
                        f"{model}/in/{spec.name}"):
                if key in data:
                    out[spec.name] = data[key]
                    break
            else:
                raise CalibrationError(f"{path}: no array '{model}/{spec.name}' "
                                       f"(has {sorted(data.files)})")
    return check_samples(out, specs, str(path))


def check_samples(samples: Samples, specs: list[TensorSpec], where: str) -> Samples:
    n = {len(a) for a in samples.values()}
    if len(n) != 1 or 0 in n:
        raise CalibrationError(f"{where}: inputs have different or zero sample counts {n}")
    for spec in specs:
        a = samples[spec.name]
        if list(a.shape[1:]) != spec.shape[1:]:
            raise CalibrationError(f"{where}: {spec.name} samples have shape {list(a.shape[1:])}, "
                                   f"model wants {spec.shape[1:]}")
        samples[spec.name] = np.ascontiguousarray(a, dtype=spec.dtype)
    return samples


def count(samples: Samples) -> int:
    return len(next(iter(samples.values())))


def take(samples: Samples, idx: slice | np.ndarray) -> Samples:
    return {k: v[idx] for k, v in samples.items()}


def batches(samples: Samples, batch: int) -> Iterator[tuple[dict[str, np.ndarray], int]]:
    """Feed dicts of `batch` consecutive samples, for a model exported with that batch, and
    how many of its rows are real (the last one is topped up with the first samples)."""
    n = count(samples)
    for i in range(0, n, batch):
        real = min(batch, n - i)
        idx = slice(i, i + batch) if real == batch else np.arange(i, i + batch) % n
        yield {k: v[idx] for k, v in samples.items()}, real


def run_all(engine: Engine, inputs: Samples, outs: list[TensorSpec] | None = None
            ) -> dict[str, np.ndarray]:
    """Every sample through `engine`, as many per call as its batch: each output [N, ...]."""
    names = [t.name for t in (outs if outs is not None else engine.output_specs)]
    results: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for feeds, real in batches(inputs, batch_of(engine.input_specs)):
        got = engine.run(feeds)
        for n in names:
            results[n].append(got[n][:real].copy())
    return {k: np.concatenate(v) for k, v in results.items()}


def batch_of(specs: list[TensorSpec]) -> int:
    """The batch a model was exported with: its inputs' leading dimension."""
    return specs[0].shape[0] if specs and specs[0].shape else 1


def synth_inputs(specs: list[TensorSpec], roles: dict[str, Any], n: int, seed: int,
                 vocab: int = 2) -> Samples:
    """`n` samples for a model's inputs, by the role the contract gives each tensor: random,
    but in each role's range (pixels 0..255, token ids < vocab, flow time in [0, 1], a
    valid prefix length, unit-scale joint values). For parity checks and, when no recorded
    data is given, calibration (a recorded .npz calibrates int8 far better)."""
    rng = np.random.default_rng(seed)
    out: Samples = {}
    for spec in specs:
        shape = (n, *spec.shape[1:])
        role = roles.get(spec.name, "")
        if spec.dtype == "uint8":
            a: np.ndarray = rng.integers(0, 256, shape, dtype=np.uint8)
        elif role == "instruction":
            a = rng.integers(0, max(vocab, 2), shape, dtype=np.int64)
        elif role == "instruction_mask":
            a = (np.arange(shape[-1]) < rng.integers(1, shape[-1] + 1, (n, 1))).astype(np.int64)
        elif role == "prefix_length":
            a = rng.integers(0, int(roles.get(f"{spec.name}:max", 1)) + 1, shape, dtype=np.int64)
        elif role == "flow_time":
            # where K >= 10 Euler steps evaluate; a rectified-flow velocity field
            # (x1 - x_t) / (1 - t) diverges as t -> 1, which parity need not chase
            a = rng.uniform(0.0, 0.9, shape)
        elif spec.dtype == "int64":
            a = rng.integers(0, 2, shape, dtype=np.int64)
        else:
            a = rng.normal(0.0, 0.5, shape)
        out[spec.name] = np.ascontiguousarray(a, dtype=spec.dtype)
    return out
