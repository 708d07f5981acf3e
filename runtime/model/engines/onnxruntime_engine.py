"""ONNX Runtime engine tuned for a hard real-time caller.

One intra-op thread, sequential execution, full graph optimisation, and I/O binding to
preallocated host buffers: a call copies the feeds in (np.copyto), runs, and hands back the
bound output arrays, so the 500 Hz follower allocates nothing per tick on its side.

A planner exported with a dynamic batch (`planner.dynamic_batch`) has a symbolic leading
dimension: its buffers hold `batch` rows and a call computes the first `rows` of them (the
same memory, bound with a shorter shape), so one observation costs one row, not `batch`.

Execution providers come from the config (`bundle.onnxruntime`): on a Jetson NVIDIA's
onnxruntime-gpu offers TensorRT and CUDA. A provider that is missing or fails to start is an
error, never ONNX Runtime's silent fall-back to the CPU (a planner 20x slower is a fault).
"""

from __future__ import annotations

from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort

from runtime.model.bundle import TensorSpec
from runtime.model.engines import EngineError, EngineInterrupted, ProviderArg, check_owner

if TYPE_CHECKING:
    from runtime.config import OnnxRuntimeConfig

# The config's names -> ONNX Runtime's.
PROVIDERS = {"tensorrt": "TensorrtExecutionProvider", "cuda": "CUDAExecutionProvider",
             "cpu": "CPUExecutionProvider"}

# ONNX Runtime's type strings -> the bundle's dtype names.
_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(uint8)": "uint8",
    "tensor(int64)": "int64",
}


def _spec(arg: ort.NodeArg, path: Path, batch: int | None) -> TensorSpec:
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise EngineError(f"{path}: tensor {arg.name!r} has unsupported type {arg.type}")
    shape = list(arg.shape)
    if shape and batch is not None and not isinstance(shape[0], int):
        shape[0] = batch  # a dynamic batch, sized for `batch` rows
    if not all(isinstance(d, int) and d > 0 for d in shape):
        raise EngineError(f"{path}: tensor {arg.name!r} has a dynamic shape {shape}; "
                          "bundles use static shapes")
    return TensorSpec(name=arg.name, dtype=dtype, shape=list(shape))


def session_options(threads: int = 1) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Worker threads spinning between 500 Hz calls would steal the core the loop sleeps on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: fp16 graphs warn about unfoldable constants
    return opts


def ort_cache_dir(engine_cache: str | Path) -> Path:
    """Where ONNX Runtime's TensorRT provider keeps its engines and timing cache: one folder
    per ONNX Runtime and TensorRT version, because its engines are valid for neither another
    ORT nor another TensorRT (ORT's TensorRT EP documentation: clear the cache after either
    changes); the GPU's compute capability is already in ORT's file names."""
    try:
        trt = metadata.version("tensorrt")
    except metadata.PackageNotFoundError:
        trt = "unknown"
    return Path(engine_cache) / "onnxruntime" / f"ort{ort.__version__}-trt{trt}"


def provider_args(names: Sequence[str], opts: OnnxRuntimeConfig, engine_cache: str | Path
                  ) -> list[ProviderArg]:
    """`providers=` for ONNX Runtime from the config's names (tensorrt, cuda, cpu), with the
    documented options of each provider: TensorRT's engine cache under `engine_cache`."""
    out: list[ProviderArg] = []
    for name in names:
        if name == "tensorrt":
            cache = str(ort_cache_dir(engine_cache))
            out.append((PROVIDERS[name], {
                "device_id": str(opts.device_id),
                "trt_fp16_enable": str(opts.trt_fp16),
                "trt_max_workspace_size": str(opts.trt_workspace_mb << 20),
                "trt_engine_cache_enable": "True",
                "trt_engine_cache_path": cache,
                # the timing cache goes to trt_engine_cache_path when no path of its own is set
                "trt_timing_cache_enable": str(opts.trt_timing_cache),
            }))
        elif name == "cuda":
            out.append((PROVIDERS[name], {"device_id": str(opts.device_id)}))
        else:
            out.append(PROVIDERS[name])
    return out


def _name(arg: ProviderArg) -> str:
    return arg if isinstance(arg, str) else arg[0]


def prepare_engine_cache(providers: Sequence[ProviderArg]) -> None:
    """TensorRT's engine cache folder: made private to this user, refused when others may
    write it (ORT loads the engines it finds there: they are code)."""
    for arg in providers:
        if isinstance(arg, tuple) and "trt_engine_cache_path" in arg[1]:
            folder = Path(arg[1]["trt_engine_cache_path"])
            try:
                folder.mkdir(mode=0o750, parents=True, exist_ok=True)
            except OSError as exc:
                raise EngineError(f"{folder}: cannot create the TensorRT engine cache "
                                  f"({exc.strerror}): check bundle.engine_cache") from None
            check_owner(folder)


class OnnxRuntimeEngine:
    def __init__(
        self,
        path: str | Path,
        threads: int = 1,
        providers: Sequence[ProviderArg] | None = None,
        batch: int | None = None,
        interruptible: bool = True,
    ) -> None:
        """`batch`: the rows a dynamic leading dimension is sized for (None: static only).
        `interruptible`: runs take the RunOptions that `interrupt` stops; ONNX Runtime 1.2x
        spends ~40 µs more on a run given RunOptions (any, even default ones: measured on a
        6-joint follower MLP, 20 -> 60 µs), which a 500 Hz follower that is never interrupted
        need not pay."""
        self.path = Path(path)
        providers = list(providers or [PROVIDERS["cpu"]])
        wanted = [_name(p) for p in providers]
        offered = ort.get_available_providers()
        missing = [p for p in wanted if p not in offered]
        if missing:
            raise EngineError(
                f"{self.path}: {', '.join(missing)} asked for (bundle.onnxruntime) but this "
                f"onnxruntime {ort.__version__} ({Path(ort.__file__).parent}) offers only "
                f"{', '.join(offered)}; install NVIDIA's onnxruntime-gpu (JetPack: the Jetson "
                "wheel, and no PyPI onnxruntime over it) or set the providers to [cpu]")
        prepare_engine_cache(providers)
        try:
            self.session = ort.InferenceSession(
                str(self.path),
                sess_options=session_options(threads),
                providers=providers,
            )
        except Exception as exc:  # ORT raises its own unrelated exception types
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from None
        running = self.session.get_providers()
        failed = [p for p in wanted if p not in running]
        if failed:  # ORT logs the provider's error and carries on without it
            raise EngineError(f"{self.path}: ONNX Runtime could not start {', '.join(failed)} "
                              "(it printed why above: TensorRT or CUDA libraries missing?) "
                              f"and would run on {', '.join(running)} instead")
        self.providers = running
        self._device_id = next((int(p[1].get("device_id", 0)) for p in providers
                                if isinstance(p, tuple)), 0)
        self._carry: list[tuple[str, str, list[ort.OrtValue]]] = []
        args = self.session.get_inputs() + self.session.get_outputs()
        self._dynamic = {a.name for a in args if a.shape and not isinstance(a.shape[0], int)}
        self.batch = batch if self._dynamic else None
        self._inputs = [_spec(a, self.path, batch) for a in self.session.get_inputs()]
        self._outputs = [_spec(a, self.path, batch) for a in self.session.get_outputs()]
        self._in_buf = {t.name: np.zeros(t.shape, dtype=t.dtype) for t in self._inputs}
        self._out_buf = {t.name: np.zeros(t.shape, dtype=t.dtype) for t in self._outputs}
        self._binding = self.session.io_binding()
        # terminate: set from another thread, ORT stops between two nodes (inside a Loop too)
        self._run_options = ort.RunOptions()
        self._run_options.log_severity_level = 4  # the interruption is ours: not an error
        self._options: ort.RunOptions | None = self._run_options if interruptible else None
        self._rows = 0
        self._bind(batch or 0)

    def _bind(self, rows: int) -> None:
        """Bound by pointer: ORT reads the inputs from and writes the outputs into our
        arrays; a dynamic tensor's first `rows` rows (a prefix of the same memory)."""
        for bufs, bind in ((self._in_buf, self._binding.bind_input),
                           (self._out_buf, self._binding.bind_output)):
            for name, buf in bufs.items():
                shape = [rows, *buf.shape[1:]] if name in self._dynamic else list(buf.shape)
                bind(name, "cpu", 0, buf.dtype, shape, buf.ctypes.data)
        self._rows = rows

    @property
    def input_specs(self) -> list[TensorSpec]:
        return list(self._inputs)

    @property
    def output_specs(self) -> list[TensorSpec]:
        return list(self._outputs)

    @property
    def inputs(self) -> dict[str, np.ndarray]:
        """The bound input buffers: fill them and pass this dict to `run` (no copy)."""
        return self._in_buf

    def run(self, feeds: dict[str, np.ndarray], rows: int | None = None) -> dict[str, np.ndarray]:
        """Outputs are the engine's own buffers, overwritten by the next call. `rows`: how
        many leading rows a dynamic-batch model computes (default: all)."""
        if self.batch is not None:
            want = self.batch if rows is None else rows
            if not 1 <= want <= self.batch:
                raise EngineError(f"{self.path}: {want} rows for a batch of {self.batch}")
            if want != self._rows:
                self._bind(want)
        if feeds is not self._in_buf:
            try:
                for name, buf in self._in_buf.items():
                    np.copyto(buf, feeds[name], casting="same_kind")
            except KeyError as exc:
                raise EngineError(f"{self.path}: missing input {exc.args[0]!r}") from None
            except (ValueError, TypeError) as exc:
                raise EngineError(f"{self.path}: bad input: {exc}") from None
        try:
            self.session.run_with_iobinding(self._binding, self._options)
        except Exception:
            if self._run_options.terminate:
                raise EngineInterrupted(f"{self.path}: run interrupted") from None
            raise
        return self._out_buf

    def interrupt(self) -> None:
        """Stop the run in progress and every later one (an interruptible engine's): its
        owner is stopping."""
        self._run_options.terminate = True

    # ------------------------------------------------------------------ loop stages
    def carry(self, pairs: Sequence[tuple[str, str]]) -> None:
        """Each carried pair gets two OrtValues on the device ONNX Runtime computes on (CUDA
        memory under the CUDA or TensorRT provider, else host memory), bound by IOBinding as
        the input and the output and swapped after each step: the KV buffer never travels
        through Python or the host between steps."""
        specs = {t.name: t for t in self._inputs + self._outputs}
        device = "cuda" if {"CUDAExecutionProvider", "TensorrtExecutionProvider"} \
            & set(self.providers) else "cpu"
        self._carry = []
        for out, inp in pairs:
            o, i = specs.get(out), specs.get(inp)
            if o is None or i is None or (o.dtype, o.shape) != (i.dtype, i.shape):
                raise EngineError(f"{self.path}: cannot carry {out} into {inp}: "
                                  f"{o and o.dtype}{o and o.shape} vs "
                                  f"{i and i.dtype}{i and i.shape}")
            pair = [ort.OrtValue.ortvalue_from_shape_and_type(
                o.shape, np.dtype(o.dtype).type, device, self._device_id) for _ in range(2)]
            self._carry.append((out, inp, pair))
            self._binding.bind_ortvalue_input(inp, pair[0])
            self._binding.bind_ortvalue_output(out, pair[1])

    def step(self, first: bool) -> dict[str, np.ndarray]:
        if first:
            for _, inp, pair in self._carry:
                pair[0].update_inplace(self._in_buf[inp])
        self.run(self._in_buf)
        for out, inp, pair in self._carry:
            pair.reverse()  # this step's output is the next step's input
            self._binding.bind_ortvalue_input(inp, pair[0])
            self._binding.bind_ortvalue_output(out, pair[1])
        return self._out_buf

    def carried(self, output: str) -> np.ndarray:
        pair = next(p for out, _, p in self._carry if out == output)
        return pair[0].numpy()
