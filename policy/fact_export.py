"""The FACT planner's two stages as ONNX graphs (opset 17, static shapes, the TorchScript
exporter as `export.onnx_export` uses it).

- stage 1 `codes`: (image, tokens, q, prefix, prefix_len) -> codes [1,L,Bits] (+-1), run once
  per observation;
- stage 2 `decoder`: (codes, x_t [1,H,J], t [1]) -> velocity [1,H,J], run K times by the
  runtime: x starts as standard Gaussian noise at t = 0, x += velocity / K at t = k / K; the
  chunk is q + (x * std + mean), with the per-joint `mean`/`std` of `FactTokenizer`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx
import torch

from policy.fact import FactDecoderStage, FactTokenizer
from policy.fact_planner import FactPlanner

OPSET = 17
STAGE_IO: dict[str, tuple[list[str], list[str]]] = {
    "codes": (["image", "tokens", "q", "prefix", "prefix_len"], ["codes"]),
    "decoder": (["codes", "x_t", "t"], ["velocity"]),
}


def decoder_inputs(tokenizer: FactTokenizer) -> tuple[torch.Tensor, ...]:
    """Contract-shaped stage-2 inputs (batch 1)."""
    g = torch.Generator().manual_seed(0)
    codes = torch.where(torch.rand(1, tokenizer.code_len, tokenizer.code_bits, generator=g)
                        < 0.5, -1.0, 1.0)
    return (codes, torch.randn(1, tokenizer.horizon, tokenizer.n_joints, generator=g),
            torch.tensor([0.25]))


def export_stage(module: torch.nn.Module, stage: str, inputs: tuple[torch.Tensor, ...],
                 path: Path) -> onnx.ModelProto:
    """Trace one stage at batch 1 into a checked, shape-inferred ONNX file."""
    in_names, out_names = STAGE_IO[stage]
    module.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(module, inputs, str(path), input_names=in_names,
                          output_names=out_names, opset_version=OPSET, dynamo=False,
                          do_constant_folding=True)
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    proto = onnx.shape_inference.infer_shapes(proto, strict_mode=True, data_prop=True)
    onnx.save(proto, str(path))
    return proto


def export_stages(planner: FactPlanner, tokenizer: FactTokenizer, out_dir: Path
                  ) -> dict[str, Path]:
    """codes.onnx and decoder.onnx in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"codes": out_dir / "codes.onnx", "decoder": out_dir / "decoder.onnx"}
    export_stage(planner, "codes", planner.example_inputs(), paths["codes"])
    export_stage(FactDecoderStage(tokenizer), "decoder", decoder_inputs(tokenizer),
                 paths["decoder"])
    return paths
