"""PyTorch -> ONNX (opset 17, static shapes but for an optional dynamic batch), checked and
shape-inferred."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from export.onnx_files import EXTERNAL_MIN_BYTES, attach_weights

OPSET = 17


class ExportError(RuntimeError):
    """The export stage refused to produce a bundle; the message says why."""


def export_onnx(model: torch.nn.Module, inputs: tuple[torch.Tensor, ...], in_names: list[str],
                out_names: list[str], path: Path, label: str,
                dynamic_batch: bool = False) -> None:
    """Trace `model` on `inputs` (in the contract's order; their leading dimension is the
    batch, symbolic in the graph with `dynamic_batch`) and write a checked, shape-inferred
    ONNX file."""
    axes = {name: {0: "batch"} for name in in_names + out_names} if dynamic_batch else None
    model.eval()
    weights = {n: t.detach() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    # a large model's graph is traced without its weights, which then go to external data
    # one by one (onnx_files.attach_weights): the exporter would otherwise hold a folded copy
    # of every weight and, under 2 GB, the whole serialized graph twice beside the model
    stream = sum(t.numel() * t.element_size() for t in weights.values()) >= EXTERNAL_MIN_BYTES
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # The TorchScript exporter is deprecated in favour of dynamo, but is the one that
            # gives stable, static-shape opset-17 graphs that quantize cleanly.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(model, inputs, str(path), input_names=in_names,
                              output_names=out_names, opset_version=OPSET, dynamo=False,
                              do_constant_folding=not stream, export_params=not stream,
                              dynamic_axes=axes)
    except Exception as exc:  # torch raises many types (TypeError for a wrong signature...)
        raise ExportError(f"{label}: torch.onnx.export failed: {exc.__class__.__name__}: "
                          f"{exc} (forward must take {in_names} in this order and return "
                          f"{out_names})") from None
    if stream:
        attach_weights(path, {n: t.numpy() for n, t in weights.items()})
    del weights
    check_onnx(path, label, dynamic_batch)


def check_onnx(path: Path, label: str, dynamic_batch: bool = False) -> None:
    """onnx.checker (full) and strict shape inference; static I/O shapes (but the leading
    one, with `dynamic_batch`). Rewrites `path` with the inferred shapes. Both run on the
    path, so a graph with external data (any size) is checked without loading its weights."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path), strict_mode=True,
                                               data_prop=True)
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # checker, inference and protobuf errors alike
        raise ExportError(f"{label}: {path.name} is not a valid ONNX model: {exc}") from None
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = list(value.type.tensor_type.shape.dim)[1 if dynamic_batch else 0:]
        if any(not d.HasField("dim_value") for d in dims):
            raise ExportError(f"{label}: {value.name} has a dynamic shape; bundles are static "
                              "(export at batch 1 with fixed sizes)")
