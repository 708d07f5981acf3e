"""Export stage: tiny torch models + the reference-shaped contract -> fp32 / fp16 / int8
bundles with parity, through the same `export_bundle` and `duet export` a company uses.

The other test files import `export_tiny` to get real bundles (real ONNX files, real
manifests) to load and tamper with.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from sim_arm import JOINTS
from torch import nn

from export.onnx_export import ExportError
from export.parity import TOLERANCES
from export.pipeline import ExportOptions, export_bundle, load_contract
from runtime.cli import main as duet
from runtime.model.bundle import load_bundle
from runtime.model.tokenizer import Tokenizer

pytestmark = pytest.mark.slow

D, H, L = 6, 10, 8


class TinyPlanner(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 5, stride=4)
        self.emb = nn.Embedding(vocab, 8)
        self.fc = nn.Linear(8 + 8 + D, 32)
        self.head = nn.Linear(32, H * D)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        x = image.permute(0, 3, 1, 2).float() * (1.0 / 255.0)
        f = torch.relu(self.conv(x)).mean(dim=(2, 3))
        h = torch.relu(self.fc(torch.cat([f, self.emb(tokens).mean(1), q], dim=1)))
        return q[:, None, :] + 0.2 * self.head(h).reshape(-1, H, D)


class TinyFollower(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(L * D + 2 * D, 64), nn.ReLU(), nn.Linear(64, D))

    def forward(self, ref: torch.Tensor, q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
        rel = (ref - q[:, None, :]).reshape(-1, L * D)
        return 0.05 * torch.tanh(self.net(torch.cat([rel, q, dq], dim=1)))


class BranchyFollower(TinyFollower):
    """Data-dependent Python control flow: tracing freezes the branch taken for the
    (small, seeded) tracing inputs, so the ONNX graph disagrees with PyTorch on real inputs
    with a fast joint."""

    def forward(self, ref: torch.Tensor, q: torch.Tensor, dq: torch.Tensor) -> torch.Tensor:
        out = super().forward(ref, q, dq)
        if float(dq.abs().max()) > 1.6:
            out = out * 0.5
        return out


def write_observations(path: Path, n: int = 24, seed: int = 0) -> Path:
    """Stand-in for the policy's recorded sim observations (keys <model>/<input>)."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(-1, 1, (n, D)).astype(np.float32)
    np.savez(path, **{
        "planner/image": rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8),
        "planner/tokens": rng.integers(0, Tokenizer().vocab_size, (n, 16)),
        "planner/q": q,
        "follower/ref": (q[:, None, :] + rng.normal(0, 0.1, (n, L, D))).astype(np.float32),
        "follower/q": q,
        "follower/dq": rng.normal(0, 1, (n, D)).astype(np.float32),
    })
    return path


def tiny_modules(follower: nn.Module | None = None) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"planner": TinyPlanner(Tokenizer().vocab_size).eval(),
            "follower": (follower or TinyFollower()).eval()}


def contract_dir(root: Path) -> Path:
    """The reference-shaped contract and its tokenizer in a folder (the export's assets)."""
    import yaml
    from onnx_bundle import REFERENCE_CONTRACT

    root.mkdir(parents=True, exist_ok=True)
    (root / "contract.yaml").write_text(yaml.safe_dump(REFERENCE_CONTRACT))
    Tokenizer().save(root / "tokenizer.json")
    return root


def export_tiny(out: Path, precision: str = "fp32", follower: nn.Module | None = None,
                sign_key: Path | None = None, **options: Any) -> Path:
    assets = contract_dir(out.parent / f"{out.name}-src")
    obs = write_observations(out.parent / f"{out.name}-obs.npz")
    opts = ExportOptions(precision=precision, calib=16, parity_samples=6, calib_data=obs,
                         sign_key=sign_key, **options)
    return export_bundle(load_contract(assets / "contract.yaml"), tiny_modules(follower), out,
                         opts, assets)


@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
def test_export_passes_parity_and_loads(tmp_path: Path, precision: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    bundle = load_bundle(export_tiny(tmp_path / "b", precision), expect_joints=JOINTS)
    c = bundle.contract
    assert bundle.manifest.format_version == 2
    assert c.planner.stages[0].precision == precision and c.planner.actions.horizon == H
    assert c.follower is not None and c.follower.reference.steps == L
    assert c.rates.follower_hz == 500.0
    assert set(bundle.files) == {"planner.onnx", "follower.onnx", "tokenizer.json",
                                 "parity.npz"}
    table = capsys.readouterr().out
    assert f"planner {precision}" in table and "FAIL" not in table
    # The stored parity set reruns through the robot-side check.
    assert duet(["export", "check", str(tmp_path / "b")]) == 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_broken_export_is_refused_and_writes_nothing(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ExportError, match=r"parity above tolerance for follower fp32"):
        export_tiny(tmp_path / "b", follower=BranchyFollower())
    assert "FAIL" in capsys.readouterr().out
    assert not (tmp_path / "b").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b-obs.npz", "b-src"]  # no scratch


def test_int8_graph_is_qdq_with_per_channel_weight_scales(tmp_path: Path) -> None:
    out = export_tiny(tmp_path / "b", "int8")
    for name in ("planner.onnx", "follower.onnx"):
        graph = onnx.load(str(out / name)).graph
        ops = [n.op_type for n in graph.node]
        assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
        assert not {"QLinearConv", "QLinearMatMul"} & set(ops)  # QDQ, not QOperator
        inits = {i.name: i for i in graph.initializer}
        per_channel = [  # int8 weight initialisers with one scale per output channel
            n for n in graph.node
            if n.op_type == "DequantizeLinear" and n.input[0] in inits
            and inits[n.input[0]].data_type == onnx.TensorProto.INT8
            and numpy_helper.to_array(inits[n.input[1]]).size > 1
        ]
        assert per_channel, f"{name}: no per-channel weight scales"
        for n in per_channel:
            zero_point = numpy_helper.to_array(inits[n.input[2]])
            assert not zero_point.any()  # symmetric: what TensorRT accepts


def test_int8_planner_with_fp32_follower_and_chosen_ops(tmp_path: Path) -> None:
    out = export_tiny(tmp_path / "b", "int8", follower_precision="fp32", int8_ops=("Conv",))
    b = load_bundle(out, expect_joints=JOINTS)
    m, c = b.manifest, b.contract
    assert c.follower is not None and m.parity is not None
    assert (c.planner.stages[0].precision, c.follower.precision) == ("int8", "fp32")
    assert m.parity.max_abs["follower"] == TOLERANCES["fp32"]["follower"]
    assert m.parity.max_abs["planner"] == TOLERANCES["int8"]["planner"]
    follower_ops = {n.op_type for n in onnx.load(str(out / "follower.onnx")).graph.node}
    assert "QuantizeLinear" not in follower_ops
    planner = onnx.load(str(out / "planner.onnx")).graph
    inits = {i.name: i.data_type for i in planner.initializer}
    weights = {n.op_type: inits.get(n.input[1]) for n in planner.node
               if n.op_type in ("Conv", "Gemm", "MatMul")}
    assert weights == {"Conv": None, "Gemm": onnx.TensorProto.FLOAT}  # conv weight: from a DQ


def test_unknown_int8_ops_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"int8 op types Softmax: expected"):
        export_tiny(tmp_path / "b", "int8", int8_ops=("Softmax",))


def test_check_fails_over_tolerance(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = export_tiny(tmp_path / "b", "int8")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["parity"]["max_abs"]["planner"] = 1e-9  # stricter than int8 can meet
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert duet(["export", "check", str(out)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_keygen_sign_and_check_via_cli(tmp_path: Path) -> None:
    key = tmp_path / "keys" / "duet.key"
    assert duet(["export", "keygen", "--out", str(key)]) == 0
    assert key.stat().st_mode & 0o077 == 0  # private key readable by owner only
    assert duet(["export", "keygen", "--out", str(key)]) == 2  # never overwrites a key
    out = export_tiny(tmp_path / "b", sign_key=key)
    assert (out / "manifest.sig").is_file()
    assert duet(["export", "check", str(out), "--public-key", f"{key}.pub",
                 "--config", "configs/sim.yaml"]) == 0


def test_export_cli_rejects_missing_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert duet(["export", "--module", "x:y"]) == 2
    assert "--contract, --out" in capsys.readouterr().err


def test_export_cli_takes_any_module_factory(tmp_path: Path) -> None:
    """`duet export --module package.module:factory`: the user's code, found from the
    working directory (here: this test module, importable from tests/)."""
    assets = contract_dir(tmp_path / "src")
    obs = write_observations(tmp_path / "obs.npz")
    assert duet(["export", "--module", "test_export:tiny_modules", "--contract",
                 str(assets / "contract.yaml"), "--out", str(tmp_path / "b"),
                 "--calib-data", str(obs), "--calib", "8", "--parity-samples", "4"]) == 0
    assert load_bundle(tmp_path / "b", expect_joints=JOINTS).manifest.format_version == 2
    assert duet(["export", "--module", "test_export:nope", "--contract",
                 str(assets / "contract.yaml"), "--out", str(tmp_path / "c")]) == 2
