"""Observations for INT8 calibration and parity checks, keyed by model input name.

Preferred source: an .npz recorded from the sim by the policy's data generation (the same
distribution the robot sees). When none is given, observations are synthesised: planner
images rendered by the MuJoCo sim at random arm poses with random instructions; follower
reference windows as smooth random motions around random states.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from runtime.bundle import TensorSpec

Samples = dict[str, np.ndarray]  # input name -> [N, *shape-without-batch]


class CalibrationError(ValueError):
    """Calibration data that does not fit the model's inputs."""


def load_npz(path: Path, model: str, specs: list[TensorSpec]) -> Samples:
    """Arrays for `model` from an .npz: key `<model>/<input>` (or `<model>_<input>`)."""
    with np.load(path) as data:
        out: Samples = {}
        for spec in specs:
            for key in (f"{model}/{spec.name}", f"{model}_{spec.name}"):
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


def rows(samples: Samples) -> Iterator[dict[str, np.ndarray]]:
    """One batch-of-1 feed dict per sample."""
    for i in range(count(samples)):
        yield {k: v[i : i + 1] for k, v in samples.items()}


class SampleReader(CalibrationDataReader):
    """onnxruntime.quantization feeds, one sample at a time."""

    def __init__(self, samples: Samples) -> None:
        self.samples = samples
        self._it = rows(samples)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._it, None)

    def rewind(self) -> None:
        self._it = rows(self.samples)


def synth_follower(n: int, joints: int, lookahead: int, dt_s: float, seed: int,
                   q_lo: np.ndarray, q_hi: np.ndarray) -> Samples:
    """Reference windows that move smoothly from near q, at up to ~1.5 rad/s."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(q_lo, q_hi, size=(n, joints))
    vel = rng.normal(0.0, 0.6, size=(n, 1, joints))
    acc = rng.normal(0.0, 3.0, size=(n, 1, joints))
    t = (np.arange(1, lookahead + 1) * dt_s)[None, :, None]
    lag = rng.normal(0.0, 0.01, size=(n, 1, joints))  # tracking error: ref starts off q
    ref = q[:, None, :] + lag + vel * t + 0.5 * acc * t**2
    dq = vel[:, 0] + rng.normal(0.0, 0.2, size=(n, joints))
    return {"ref": ref.astype(np.float32), "q": q.astype(np.float32),
            "dq": dq.astype(np.float32)}


def synth_planner(n: int, seed: int, tokenizer_words: list[str], max_tokens: int) -> Samples:
    """Sim renders at random poses with random (valid) instructions."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    from runtime.tokenizer import Tokenizer
    from sim.world import BLOCK_COLOURS, HOME_Q, SimWorld

    tok = Tokenizer(tokenizer_words, max_len=max_tokens)
    rng = np.random.default_rng(seed)
    world = SimWorld(seed=seed)
    images = np.zeros((n, 96, 96, 3), np.uint8)
    tokens = np.zeros((n, max_tokens), np.int64)
    qs = np.zeros((n, len(HOME_Q)), np.float32)
    for i in range(n):
        q = np.clip(HOME_Q + rng.normal(0.0, 0.4, size=HOME_Q.shape), world.q_min, world.q_max)
        world.set_joint_state(q)
        images[i] = world.render()
        a, b = rng.choice(BLOCK_COLOURS, size=2, replace=False)
        text = f"touch the {a} block" if i % 2 else f"touch the {a} block, then the {b} one"
        tokens[i] = tok.encode(text)
        qs[i] = world.q()
    return {"image": images, "tokens": tokens, "q": qs}
