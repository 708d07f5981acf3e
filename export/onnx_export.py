"""PyTorch -> ONNX (opset 17, static shapes), checked and shape-inferred."""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

OPSET = 17

# The fixed model I/O contract (names in forward-argument order).
IO_NAMES: dict[str, tuple[list[str], list[str]]] = {
    "planner": (["image", "tokens", "q"], ["waypoints"]),
    "follower": (["ref", "q", "dq"], ["residual"]),
}


class ExportError(RuntimeError):
    """The export stage refused to produce a bundle; the message says why."""


def export_onnx(model: torch.nn.Module, kind: str, inputs: tuple[torch.Tensor, ...],
                path: Path) -> onnx.ModelProto:
    """Trace `model` at batch 1 and write a checked, shape-inferred ONNX file."""
    in_names, out_names = IO_NAMES[kind]
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated in favour of dynamo, but is the one that
        # gives stable, static-shape opset-17 graphs that quantize cleanly.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(model, inputs, str(path), input_names=in_names,
                          output_names=out_names, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    try:
        onnx.checker.check_model(proto, full_check=True)
        proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"{kind}: exported graph is invalid: {exc}") from exc
    for value in list(proto.graph.input) + list(proto.graph.output):
        dims = value.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise ExportError(f"{kind}: {value.name} has a dynamic shape; bundles are static")
    onnx.save(proto, str(path))
    return proto
