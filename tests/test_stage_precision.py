"""Precision per stage: a two-stage planner (a prefix with a token embedding and MatMuls
whose features condition a flow expert) exported with the prefix weight-only quantized and
the expert in fp32; parity judged per output by role and on the planner's final chunk in
radians, with the stage that costs the error named."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import onnx
import pytest
import torch
import yaml
from sim_arm import JOINTS
from torch import nn

from export.onnx_export import ExportError
from export.pipeline import ExportOptions, export_bundle, load_contract, parse_precision
from runtime.model.bundle import load_bundle
from runtime.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

H, L, W = 10, 16, 64
D = len(JOINTS)


class Prefix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(300, W)
        self.mlp = nn.Sequential(nn.Linear(W + D, 4 * W), nn.GELU(), nn.Linear(4 * W, W))

    def forward(self, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        x = torch.cat([self.emb(tokens), q[:, None, :].expand(-1, L, -1)], dim=-1)
        return self.mlp(x)  # [1, L, W]: 3-D, so Linear traces to MatMul


class Expert(nn.Module):
    """The rectified-flow velocity toward x1 = a bounded function of the features."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(W, H * D)

    def forward(self, feats: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x1 = 0.5 * torch.tanh(self.head(feats.mean(1))).reshape(-1, H, D)
        return (x1 - x_t) / (1.0 - t[:, None, None])


CONTRACT: dict[str, Any] = {
    "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
    "planner": {
        "stages": [
            {"name": "prefix", "file": "prefix.onnx", "inputs": [
                {"role": "instruction", "name": "tokens", "tokenizer": "tokenizer.json",
                 "max_len": L},
                {"role": "proprio", "name": "q", "field": "q"}],
             "outputs": [{"role": "features", "name": "feats", "shape": [1, L, W]}]},
            {"name": "expert", "file": "expert.onnx", "flow": {"steps": 10}, "inputs": [
                {"role": "stage", "name": "feats", "source": "prefix.feats"},
                {"role": "noise", "name": "x_t"},
                {"role": "flow_time", "name": "t"}],
             "outputs": [{"role": "velocity", "name": "v"}]}],
        "actions": {"horizon": H, "dt_s": 0.1, "kind": "absolute", "joints": JOINTS}},
}


def _export(out: Path, precision: str) -> tuple[Path, str]:
    src = out.with_name(out.name + ".src")
    src.mkdir(parents=True)
    (src / "contract.yaml").write_text(yaml.safe_dump(CONTRACT))
    Tokenizer().save(src / "tokenizer.json")
    torch.manual_seed(0)
    default, per = parse_precision(precision)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        export_bundle(load_contract(src / "contract.yaml"),
                      {"prefix": Prefix().eval(), "expert": Expert().eval()}, out,
                      ExportOptions(precision=default, models=per, calib=8, parity_samples=4),
                      src)
    return out, printed.getvalue()


@pytest.mark.parametrize("prefix", ["int8w", "int4w", "fp16"])
def test_prefix_reduced_expert_fp32(tmp_path: Path, prefix: str) -> None:
    out, report = _export(tmp_path / "b", f"prefix={prefix},expert=fp32")
    b = load_bundle(out, expect_joints=JOINTS)
    assert {s.name: s.precision for s in b.contract.planner.stages} == \
        {"prefix": prefix, "expert": "fp32"}
    assert "-mixed-" in b.version
    graph = onnx.load(str(out / "prefix.onnx"), load_external_data=False)
    ops = {n.op_type for n in graph.graph.node}
    if prefix != "fp16":
        assert "MatMulNBits" in ops and "MatMul" not in ops  # every MatMul weight-only
        int8 = [t for t in graph.graph.initializer if t.data_type == onnx.TensorProto.INT8]
        assert [list(t.dims) for t in int8] == [[300, W]]  # the embedding table, per row
    # features judged relative, the chunk in radians, the reduced stage named
    assert "feats" in report and " rel " in report
    assert "only prefix" in report and "bundle" in report and "rad" in report
    assert b.parity is not None and b.parity.max_rel["prefix"] > 0


def test_precision_naming_a_model_the_contract_lacks_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"--precision names \['decoder'\]; the contract's "
                                          r"models are \['prefix', 'expert'\]"):
        _export(tmp_path / "b", "prefix=int8w,decoder=fp32")


@pytest.mark.parametrize("text", ["bf16", "prefix=bf16"])
def test_bf16_is_refused_saying_where_it_runs(tmp_path: Path, text: str) -> None:
    with pytest.raises(ExportError, match="no bf16 MatMul/Add/Gemm"):
        _export(tmp_path / "b", text)


def test_a_chunk_over_tolerance_names_the_stage(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from export import parity

    monkeypatch.setitem(parity.TOLERANCES, "int4w", {"planner": 1e-9, "follower": 1e-9,
                                                     "relative": 1.0})
    with pytest.raises(ExportError, match=r"the planner's chunk \(only prefix\)"):
        _export(tmp_path / "b", "prefix=int4w,expert=fp32")


def test_a_torch_planner_with_an_onnx_follower_in_one_export(tmp_path: Path) -> None:
    """The factory gives the planner; the follower is the ONNX file the contract names."""
    from onnx_bundle import _follower
    from test_export import contract_dir, tiny_modules

    assets = contract_dir(tmp_path / "src")
    onnx.save(_follower(D, 0.5), assets / "follower.onnx")
    with contextlib.redirect_stdout(io.StringIO()):
        out = export_bundle(load_contract(assets / "contract.yaml"),
                            {"planner": tiny_modules()["planner"]}, tmp_path / "b",
                            ExportOptions(calib=4, parity_samples=2), assets)
    assert set(load_bundle(out, expect_joints=JOINTS).model_specs()) == {"planner", "follower"}


def test_neither_module_nor_onnx_file_names_what_is_missing(tmp_path: Path) -> None:
    from test_export import contract_dir, tiny_modules

    assets = contract_dir(tmp_path / "src")
    with pytest.raises(ExportError, match=r"no module and no ONNX file \(.*follower\.onnx\) "
                                          r"for \['follower'\]"):
        export_bundle(load_contract(assets / "contract.yaml"),
                      {"planner": tiny_modules()["planner"]}, tmp_path / "b",
                      ExportOptions(calib=4, parity_samples=2), assets)


class ExpertT2(Expert):
    """The same field, its flow time as [batch, 1] (as many flow models take it)."""

    def forward(self, feats: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return super().forward(feats, x_t, t[:, 0])


def test_a_flow_time_of_rank_2_comes_from_the_contract(tmp_path: Path) -> None:
    import copy

    contract = copy.deepcopy(CONTRACT)
    contract["planner"]["stages"][1]["inputs"][2]["rank"] = 2
    src = tmp_path / "src"
    src.mkdir()
    (src / "contract.yaml").write_text(yaml.safe_dump(contract))
    Tokenizer().save(src / "tokenizer.json")
    with contextlib.redirect_stdout(io.StringIO()):
        out = export_bundle(load_contract(src / "contract.yaml"),
                            {"prefix": Prefix().eval(), "expert": ExpertT2().eval()},
                            tmp_path / "b", ExportOptions(calib=4, parity_samples=2), src)
    spec = load_bundle(out).model_specs()["expert"]
    assert spec.input("t").shape == [1, 1]
