"""`duet engines build`: TensorRT 10+ engines built on the target from a verified bundle.

Runs on the robot (Jetson / NVIDIA GPU with TensorRT and cuda-python), never on the
workstation: TensorRT plans are specific to the GPU and TensorRT version, so they are built
once per device and cached by (ONNX sha256, TensorRT version, GPU name, precision) in a cache
folder, next to one timing cache file that makes rebuilds fast.

This machine (CI, the development box) has neither TensorRT nor a GPU: this module is only
type-checked (mypy against tensorrt-stubs), not executed, here. Imports TensorRT lazily.
"""

from __future__ import annotations

import time
from pathlib import Path

from runtime.model.bundle import Bundle, sha256_file
from runtime.model.bundle_files import ModelSpec
from runtime.model.engines import EngineError
from runtime.model.engines.tensorrt_engine import cached_engine_path

TIMING_CACHE = "timing.cache"
WORKSPACE_BYTES = 1 << 30


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    precision: str,
    timing_cache: Path,
) -> Path:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch (the creation flag is deprecated).
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    # from the file, not its bytes: the parser then finds the graph's external data beside it
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT ONNX parser failed: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    if precision == "bf16":  # Ampere and later (Orin): from the fp32 graph
        config.set_flag(trt.BuilderFlag.BF16)
    if precision in ("fp16", "int8"):
        config.set_flag(trt.BuilderFlag.FP16)  # int8: layers without Q/DQ may run in fp16
    if precision == "int8":
        # Explicit quantization: the scales come from the QDQ nodes in the graph.
        config.set_flag(trt.BuilderFlag.INT8)
    cache = config.create_timing_cache(timing_cache.read_bytes() if timing_cache.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT build failed ({precision})")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan_path.with_suffix(".tmp")
    tmp.write_bytes(bytes(serialized))
    tmp.replace(plan_path)  # atomic: a half-written plan is never picked up
    # what the runtime checks before it loads the plan (runtime.model.engines.tensorrt_engine)
    plan_path.with_name(plan_path.name + ".sha256").write_text(sha256_file(plan_path) + "\n")
    timing_cache.write_bytes(bytes(config.get_timing_cache().serialize()))
    return plan_path


def engine_precision(model: ModelSpec, requested: str | None) -> str:
    """fp16 and bf16 can be built from any bundle; int8 needs the QDQ graph of an int8
    bundle; weight-only graphs (MatMulNBits, an ONNX Runtime contrib op) none."""
    if model.precision in ("int8w", "int4w"):
        raise EngineError(
            f"{model.file}: {model.precision} (weight-only MatMulNBits) is an ONNX Runtime "
            "operator TensorRT cannot parse; run it with engine: onnxruntime (CPU, CUDA), or "
            "export this model fp32/fp16 and build fp16/bf16 engines")
    if requested is None:
        return model.precision
    if requested == "int8" and model.precision != "int8":
        raise EngineError(
            f"{model.file}: int8 engines need an int8 (QDQ) bundle; this one is {model.precision}"
        )
    return requested


def build_bundle_engines(
    bundle: Bundle,
    cache_dir: Path,
    precision: str | None = None,
    force: bool = False,
) -> dict[str, Path]:
    """Build (or reuse from the cache) one engine per model; returns model -> plan path."""
    plans: dict[str, Path] = {}
    for name, model in bundle.model_specs().items():
        prec = engine_precision(model, precision)
        plan = cached_engine_path(cache_dir, bundle.files[model.file], prec)
        if plan.is_file() and not force:
            print(f"{name}: cached {plan}")
        else:
            t0 = time.monotonic()
            build_engine(bundle.path / model.file, plan, prec, cache_dir / TIMING_CACHE)
            print(f"{name}: built {plan} ({prec}) in {time.monotonic() - t0:.1f} s")
        plans[name] = plan
    return plans
