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


# Weight-only precisions: MatMul weights in int8/int4 blocks (ONNX Runtime's MatMulNBits),
# embedding tables (Gather) in int8 per row; no calibration. Accuracy level 4: the CPU kernel
# quantizes each activation block to int8 on the fly and multiplies in int8 (measured on this
# x86 host, 1024x3072 weights, 48 rows: 53 ms against 223 ms for fp32 activations, fp32
# MatMul 50 ms, for 0.73 % instead of 0.57 % relative error).
ACCURACY_LEVEL = 4
WEIGHT_ONLY_BITS = {"int8w": 8, "int4w": 4}
BLOCK = 32  # weights per scale along K: finer than per-channel, ONNX Runtime's fast path
MIN_EMBEDDING_ROWS = 256  # smaller Gather tables (positions, codes) stay float


def to_weight_only(src: Path, dst: Path, bits: int, external: bool = False) -> None:
    import logging

    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    # it logs every node it visits at INFO
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(
        logging.WARNING)
    model = onnx.load(str(src))
    quant = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK, is_symmetric=True,
                                 accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
    quant.process()
    out = quant.model.model
    del quant, model
    quantize_embeddings(out)
    save(out, dst, external)
    onnx.checker.check_model(str(dst))


def quantize_embeddings(model: onnx.ModelProto) -> int:
    """Every Gather from a float [V, D] table (V >= MIN_EMBEDDING_ROWS) becomes a Gather from
    an int8 table and from its per-row scales: rows = q[ids] * scale[ids]. Only the rows
    looked up are dequantized (a DequantizeLinear of the whole table would rebuild it at
    every call). Returns how many tables were quantized."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    done, nodes = 0, []
    for node in graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or table.data_type != onnx.TensorProto.FLOAT or axis != 0 \
                or len(table.dims) != 2 or table.dims[0] < MIN_EMBEDDING_ROWS \
                or users[table.name] != 1:
            nodes.append(node)
            continue
        w = numpy_helper.to_array(table)
        scale = np.maximum(np.abs(w).max(axis=1, keepdims=True), 1e-12) / 127.0
        q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
        base = table.name
        graph.initializer.remove(table)
        graph.initializer.extend([numpy_helper.from_array(q, f"{base}_int8"),
                                  numpy_helper.from_array(scale.astype(np.float32),
                                                          f"{base}_scale")])
        ids, out = node.input[1], node.output[0]
        nodes += [
            helper.make_node("Gather", [f"{base}_int8", ids], [f"{out}_q"], axis=0),
            helper.make_node("Gather", [f"{base}_scale", ids], [f"{out}_s"], axis=0),
            helper.make_node("Cast", [f"{out}_q"], [f"{out}_f"], to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [f"{out}_f", f"{out}_s"], [out]),
        ]
        done += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return done
