"""Native TensorRT 10+ engine (Jetson / NVIDIA GPU targets).

Deserialises a plan built on this very device by `duet engines build` and runs it with
`execute_async_v3` on one CUDA stream. Device buffers come from cuda-python (`cuda.bindings.
runtime`, or the older `cuda.cudart`), imported lazily so this module imports anywhere.
Host buffers are preallocated; `run` copies feeds in, launches, copies outputs back and
synchronises the stream, returning the preallocated host outputs.

It cannot run on a machine without TensorRT and a GPU (the CI box has neither): it is
type-checked with tensorrt-stubs, and exercised on the target by `duet export check`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from runtime.model.bundle import sha256_file
from runtime.model.bundle_files import TensorSpec
from runtime.model.engines import EngineError, EngineInterrupted, check_owner

_NP_TO_DTYPE = {
    np.dtype(np.float32): "float32",
    np.dtype(np.float16): "float16",
    np.dtype(np.uint8): "uint8",
    np.dtype(np.int64): "int64",
}


def require_tensorrt() -> None:
    """Raise EngineError unless the real TensorRT Python API is importable."""
    try:
        import tensorrt as trt

        # tensorrt-stubs alone leave an empty namespace package named `tensorrt`.
        available = hasattr(trt, "Builder")
    except ImportError:
        available = False
    if not available:
        raise EngineError("TensorRT is not installed on this machine (engine: onnxruntime "
                          "works everywhere; TensorRT 10+ comes with JetPack / NVIDIA wheels)")


def cudart() -> Any:
    """The CUDA runtime module of cuda-python (its module path moved in 12.6)."""
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime
        except ImportError:
            raise EngineError(
                "cuda-python is not installed (pip install '.[jetson]')"
            ) from None
    return runtime


def cuda_call(result: Any) -> Any:
    """cuda-python returns (error, value...) tuples; raise on an error, return the value(s)."""
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise EngineError(f"CUDA error {err}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def gpu_name(device: int = 0) -> str:
    props = cuda_call(cudart().cudaGetDeviceProperties(device))
    name = props.name
    return name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)


def engine_cache_key(onnx_sha256: str, precision: str, trt_version: str, gpu: str) -> str:
    """File name of a cached engine: one per (ONNX file, precision, TensorRT, GPU)."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower() or "gpu"
    return f"{onnx_sha256[:16]}-{precision}-trt{trt_version}-{slug}.plan"


def check_trusted(plan: Path) -> None:
    """A serialized engine is code for the GPU: load it only from a cache that root or this
    service user owns and nobody else can write, and only with the sha256 recorded when it
    was built (`<plan>.sha256`). A planted or swapped file is refused, naming why."""
    for path in (plan.parent, plan):
        check_owner(path)
    recorded = plan.with_name(plan.name + ".sha256")
    try:
        want = recorded.read_text().split()[0]
    except (OSError, IndexError):
        raise EngineError(f"{recorded}: missing: rebuild with `duet engines build`") from None
    if sha256_file(plan) != want:
        raise EngineError(f"{plan}: sha256 differs from the one recorded at build time "
                          "(modified or corrupt): rebuild with `duet engines build --force`")


def cached_engine_path(cache_dir: Path, onnx_sha256: str, precision: str) -> Path:
    import tensorrt as trt

    return cache_dir / engine_cache_key(onnx_sha256, precision, trt.__version__, gpu_name())


class TensorRTEngine:
    def __init__(self, plan_path: str | Path) -> None:
        import tensorrt as trt

        self.path = Path(plan_path)
        self._rt = cudart()
        logger = trt.Logger(trt.Logger.WARNING)
        self._runtime = trt.Runtime(logger)
        engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
        if engine is None:
            raise EngineError(f"{self.path}: TensorRT cannot deserialise it (built for "
                              "another TensorRT version or GPU?)")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = cuda_call(self._rt.cudaStreamCreate())
        self._inputs: list[TensorSpec] = []
        self._outputs: list[TensorSpec] = []
        self._host: dict[str, np.ndarray] = {}
        self._device: dict[str, int] = {}
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dims = engine.get_tensor_shape(name)
            shape = [int(dims[k]) for k in range(len(dims))]
            np_dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            dtype = _NP_TO_DTYPE.get(np_dtype)
            if dtype is None or any(d <= 0 for d in shape):
                raise EngineError(f"{self.path}: tensor {name!r} {np_dtype}{shape} unsupported")
            spec = TensorSpec(name=name, dtype=dtype, shape=shape)
            is_input = engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT
            (self._inputs if is_input else self._outputs).append(spec)
            host = np.zeros(shape, dtype=np_dtype)
            self._host[name] = host
            self._device[name] = int(cuda_call(self._rt.cudaMalloc(host.nbytes)))
            self._context.set_tensor_address(name, self._device[name])
        self._out_dict = {t.name: self._host[t.name] for t in self._outputs}
        self._in_dict = {t.name: self._host[t.name] for t in self._inputs}
        self._interrupted = False
        self._carry: list[tuple[str, str, list[int]]] = []  # (output, input, device pair)
        self._skip_h2d: set[str] = set()  # carried inputs past a loop's first step
        self._skip_d2h: set[str] = set()  # carried outputs: read with `carried`

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_specs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """The host input buffers: fill them and pass this dict to `run` (no copy)."""
        return self._in_dict

    def run(self, feeds: dict[str, np.ndarray], rows: int | None = None
            ) -> dict[str, np.ndarray]:
        """`rows` is ignored: native engines are static and compute every row."""
        if self._interrupted:
            raise EngineInterrupted(f"{self.path}: interrupted")
        rt = self._rt
        h2d = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        d2h = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
        if feeds is not self._in_dict:
            try:
                for t in self._inputs:
                    np.copyto(self._host[t.name], feeds[t.name], casting="same_kind")
            except KeyError as exc:
                raise EngineError(f"{self.path}: missing input {exc.args[0]!r}") from None
        for t in self._inputs:
            if t.name in self._skip_h2d:
                continue
            host = self._host[t.name]
            cuda_call(rt.cudaMemcpyAsync(self._device[t.name], host.ctypes.data, host.nbytes,
                                         h2d, self._stream))
        if not self._context.execute_async_v3(int(self._stream)):
            raise EngineError(f"{self.path}: execute_async_v3 failed")
        for t in self._outputs:
            if t.name in self._skip_d2h:
                continue
            host = self._host[t.name]
            cuda_call(rt.cudaMemcpyAsync(host.ctypes.data, self._device[t.name], host.nbytes,
                                         d2h, self._stream))
        cuda_call(rt.cudaStreamSynchronize(self._stream))
        return self._out_dict

    # ------------------------------------------------------------------ loop stages
    def carry(self, pairs: Sequence[tuple[str, str]]) -> None:
        """A second device buffer per pair; after each step the pair's addresses swap
        (set_tensor_address), so a KV buffer stays on the GPU between steps."""
        specs = {t.name: t for t in self._inputs + self._outputs}
        for out, inp in pairs:
            o, i = specs.get(out), specs.get(inp)
            if o is None or i is None or (o.dtype, o.shape) != (i.dtype, i.shape):
                raise EngineError(f"{self.path}: cannot carry {out} into {inp}")
            self._carry.append((out, inp, [self._device[inp], self._device[out]]))
        self._skip_d2h = {out for out, _, _ in self._carry}

    def step(self, first: bool) -> dict[str, np.ndarray]:
        self._skip_h2d = set() if first else {inp for _, inp, _ in self._carry}
        out = self.run(self._in_dict)
        for name, inp, pair in self._carry:
            pair.reverse()
            self._device[inp], self._device[name] = pair
            self._context.set_tensor_address(inp, pair[0])
            self._context.set_tensor_address(name, pair[1])
        return out

    def carried(self, output: str) -> np.ndarray:
        host = self._host[output]
        inp = next(i for o, i, _ in self._carry if o == output)
        cuda_call(self._rt.cudaMemcpy(host.ctypes.data, self._device[inp], host.nbytes,
                                      self._rt.cudaMemcpyKind.cudaMemcpyDeviceToHost))
        return host.copy()

    def interrupt(self) -> None:
        """An enqueued engine cannot be cancelled (one call is milliseconds on the GPU): the
        next call refuses, so a multi-step plan stops at its next step."""
        self._interrupted = True

    def close(self) -> None:
        for ptr in self._device.values():
            cuda_call(self._rt.cudaFree(ptr))
        self._device.clear()
        cuda_call(self._rt.cudaStreamDestroy(self._stream))
