"""Inference engines behind one small interface, so the planner and follower loops do not care
whether a model runs on ONNX Runtime (CPU/CUDA/TensorRT execution provider) or native TensorRT.

`run(feeds)` copies the feeds into preallocated input buffers and returns *preallocated* output
arrays: they are overwritten by the next `run`, so copy anything you keep.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np

from runtime.model.bundle import Bundle
from runtime.model.bundle_files import ModelSpec, TensorSpec

if TYPE_CHECKING:
    from runtime.config import BundleConfig


class EngineError(Exception):
    """An engine that cannot be created or a call with bad feeds; the message says which."""


class EngineInterrupted(EngineError):
    """A run stopped by `interrupt` (the process is stopping), not a failure."""


class Engine(Protocol):
    @property
    def input_specs(self) -> list[TensorSpec]: ...

    @property
    def output_specs(self) -> list[TensorSpec]: ...

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """The engine's own input buffers: a caller that fills them in place and passes
        this very dict to `run` saves the copy."""
        ...

    def run(self, feeds: dict[str, np.ndarray], rows: int | None = None
            ) -> dict[str, np.ndarray]:
        """`rows`: the leading rows to compute, for a dynamic-batch model (else all)."""
        ...

    def interrupt(self) -> None:
        """From another thread or a signal's watcher: a run in progress stops as soon as the
        engine can (raising EngineInterrupted), and so does every later one."""
        ...

    def carry(self, pairs: Sequence[tuple[str, str]]) -> None:
        """A loop stage: after each `step`, output o's value is input i's at the next step
        (pairs (o, i)), kept where the engine computes (two buffers per pair, swapped, no
        copy through the host). `inputs[i]` is what the first step of a loop reads."""
        ...

    def step(self, first: bool) -> dict[str, np.ndarray]:
        """One step of a loop (`first`: its carried inputs from `inputs`); the outputs that
        are not carried, as `run` gives them."""
        ...

    def carried(self, output: str) -> np.ndarray:
        """The newest value of a carried output, on the host (a copy)."""
        ...


EngineKind = Literal["onnxruntime", "tensorrt"]
# ONNX Runtime's `providers=`: a name, or (name, options) as its Python API takes them.
ProviderArg = str | tuple[str, dict[str, str]]


DEFAULT_ENGINE_CACHE = "/var/lib/duet/engines"


def check_owner(path: Path) -> None:
    """Engines are code for the GPU: load them only from a path that root or this service
    user owns and that nobody else can write."""
    st = path.stat()
    if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
        raise EngineError(f"{path}: engine cache must be owned by root (or this service user) "
                          "and writable by nobody else; refusing to load engines from it")


def engine_options(cfg: BundleConfig, role: Literal["planner", "follower"]) -> dict[str, Any]:
    """make_engine's keywords for one process from the config: the engine cache and, for
    ONNX Runtime, that process's providers with their options."""
    out: dict[str, Any] = {"cache_dir": cfg.engine_cache}
    if cfg.engine == "onnxruntime":
        from runtime.model.engines.onnxruntime_engine import provider_args

        names = getattr(cfg.onnxruntime, f"{role}_providers")
        out["providers"] = provider_args(names, cfg.onnxruntime, cfg.engine_cache)
    return out


def check_specs(model: ModelSpec, engine: Engine, where: str) -> None:
    """Refuse an engine whose tensors disagree with the contract, naming each tensor."""
    for kind, declared, actual in (
        ("input", model.inputs, engine.input_specs),
        ("output", model.outputs, engine.output_specs),
    ):
        want = {t.name: t for t in declared}
        have = {t.name: t for t in actual}
        problems = [f"{kind} {name!r}: the contract gives {t.dtype}{t.shape}, the model has "
                    + (f"{have[name].dtype}{have[name].shape}" if name in have else "no such "
                       "tensor")
                    for name, t in want.items() if have.get(name) != t]
        problems += [f"{kind} {name!r}: the model has it, the contract does not say what it "
                     "is" for name in have if name not in want]
        if problems:
            raise EngineError(f"{where}: " + "; ".join(problems))


def make_engine(
    model_spec: ModelSpec,
    bundle: Bundle,
    kind: EngineKind = "onnxruntime",
    *,
    threads: int = 1,
    providers: Sequence[ProviderArg] | None = None,
    cache_dir: str | Path | None = None,
    dynamic_batch: int | None = None,
    interruptible: bool = True,
) -> Engine:
    """An engine for one model of a verified bundle. `dynamic_batch`: the most rows a model
    exported with a dynamic batch is called with. `interruptible=False`: ONNX Runtime runs
    without RunOptions, ~40 µs less a call (the follower's model, never interrupted).

    onnxruntime: the bundle's ONNX file, on `providers` (default: the CPU). tensorrt: the
    engine that `duet engines build` cached for this ONNX file, this TensorRT version, this GPU
    and this precision (never built here: building takes minutes and belongs to install time,
    not to start-up).
    """
    onnx_path = bundle.path / model_spec.file
    engine: Engine
    if kind == "onnxruntime":
        from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine

        engine = OnnxRuntimeEngine(onnx_path, threads=threads, providers=providers,
                                   batch=dynamic_batch, interruptible=interruptible)
    elif kind == "tensorrt" and dynamic_batch is not None:
        raise EngineError(f"{onnx_path}: a dynamic batch runs on ONNX Runtime (its CUDA or "
                          "TensorRT execution provider); native TensorRT engines are static")
    elif kind == "tensorrt":
        from runtime.model.engines.tensorrt_engine import (
            TensorRTEngine,
            cached_engine_path,
            check_trusted,
            require_tensorrt,
        )

        require_tensorrt()
        onnx_sha = bundle.files[model_spec.file]
        cache = Path(cache_dir if cache_dir is not None else DEFAULT_ENGINE_CACHE)
        plan = cached_engine_path(cache, onnx_sha, model_spec.precision)
        if not plan.is_file():
            raise EngineError(
                f"{plan}: no TensorRT engine for {model_spec.file} ({model_spec.precision}) "
                f"on this GPU/TensorRT; run `duet engines build --bundle {bundle.path}`"
            )
        check_trusted(plan)
        engine = TensorRTEngine(plan)
    else:
        raise EngineError(f"unknown engine kind {kind!r} (onnxruntime | tensorrt)")
    check_specs(model_spec, engine, str(onnx_path))
    return engine
