"""Reduced-precision variants of an fp32 ONNX graph (I/O types stay as in the contract).

fp16: weights and activations in half precision, graph inputs/outputs kept fp32/uint8/int64
(`keep_io_types`), so the runtime feeds the same arrays for every precision.
int8: static QDQ quantization, per-channel symmetric int8 weights, symmetric int8
activations calibrated on recorded observations: the form TensorRT builds INT8 engines from
(explicit quantization) and ONNX Runtime runs with int8 kernels on CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_static,
)
from onnxruntime.quantization.shape_inference import quant_pre_process
from onnxruntime.transformers.float16 import convert_float_to_float16

from export.calibration import Samples, batches
from export.onnx_files import save

# Only the compute-heavy ops: Gather (token embedding), LayerNorm, Softmax stay float.
# `duet export --int8-ops` narrows this per bundle: the reference planner's MLP layers are
# <1 % of its multiply-adds and lose the most accuracy in int8, so it quantizes Conv only.
QUANTIZABLE_OPS = ("Conv", "MatMul", "Gemm")


class SampleReader(CalibrationDataReader):
    """onnxruntime.quantization feeds, `batch` samples at a time."""

    def __init__(self, samples: Samples, batch: int = 1) -> None:
        self.samples, self.batch = samples, batch
        self.rewind()

    def get_next(self) -> dict[str, np.ndarray] | None:
        got = next(self._it, None)
        return None if got is None else got[0]

    def rewind(self) -> None:
        self._it = batches(self.samples, self.batch)


def to_fp16(src: Path, dst: Path, external: bool = False) -> None:
    model = onnx.load(str(src))
    half = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends the I/O casts at the end of the node list; ONNX requires
    # topological order, so sort it (onnx_ir ships with onnxscript, an export dependency).
    graph = ir.from_proto(half)
    graph.graph.sort()
    half = ir.to_proto(graph)
    del graph, model
    save(half, dst, external)
    onnx.checker.check_model(str(dst))


def to_int8(src: Path, dst: Path, calibration: Samples,
            op_types: tuple[str, ...] = QUANTIZABLE_OPS, batch: int = 1,
            external: bool = False) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        # Symbolic shape inference + constant folding first, as ORT recommends for QDQ.
        prepped = Path(tmp) / "prepped.onnx"
        quant_pre_process(str(src), str(prepped), skip_symbolic_shape=False,
                          save_as_external_data=external)
        quantize_static(
            str(prepped),
            str(dst),
            SampleReader(calibration, batch),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            op_types_to_quantize=list(op_types),
            # TensorRT takes symmetric (zero-point 0) scales only.
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
            use_external_data_format=external,
        )
    onnx.checker.check_model(str(dst))
