"""Graphs whose weights live in external data files (every graph over 2 GB): `duet bundle
create` and `duet export` write and accept them, the manifest lists, hashes and signs every
data file, and `load_bundle` refuses a graph that makes ONNX Runtime read a file the manifest
does not list, or a data file that changed."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import helper, numpy_helper
from onnx_bundle import REFERENCE_CONTRACT, _follower, _planner
from sim_arm import JOINTS
from test_export import export_tiny

from export import onnx_files
from export.signing import keygen, sign_bundle
from runtime.model.bundle import BundleError, load_bundle
from runtime.model.engines import make_engine
from runtime.model.onnx_refs import OnnxRefError, external_locations
from runtime.model.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
D = len(JOINTS)


def _source(root: Path) -> Path:
    """The reference contract and two graphs, the planner's weights in a data file per
    tensor (as PyTorch's exporter writes a graph over 2 GB)."""
    root.mkdir(parents=True)
    planner = _planner(np.linspace(0, 0.3, 10 * D).reshape(10, D))
    # + sum(2 KB of zeros): a tensor large enough to live outside the graph
    planner.graph.node[-1].output[0] = "moved"
    planner.graph.node.extend([
        helper.make_node("ReduceSum", ["zeros"], ["zero"], keepdims=0),
        helper.make_node("Add", ["moved", "zero"], ["waypoints"])])
    planner.graph.initializer.append(numpy_helper.from_array(np.zeros(512, np.float32),
                                                             "zeros"))
    onnx.save_model(planner, root / "planner.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=False, size_threshold=0)
    assert external_locations(root / "planner.onnx") == {"axis1", "offsets", "zeros"}
    onnx.save(_follower(D, 0.0), root / "follower.onnx")
    Tokenizer().save(root / "tokenizer.json")
    (root / "contract.yaml").write_text(yaml.safe_dump(REFERENCE_CONTRACT))
    return root


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A signed bundle made by `duet bundle create` from a graph with external data."""
    root = tmp_path_factory.mktemp("ext")
    src = _source(root / "src")
    key, _ = keygen(root / "keys" / "k")
    out = root / "bundle"
    done = subprocess.run(
        [sys.executable, "-m", "runtime.cli", "bundle", "create", "--contract",
         str(src / "contract.yaml"), "--out", str(out), "--calib", "4", "--parity-samples",
         "2", "--sign-key", str(key)], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stderr
    return out, key


@pytest.fixture
def bundle(built: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "b"))


def test_external_data_is_bundled_listed_signed_and_loads(built: tuple[Path, Path]) -> None:
    out, key = built
    manifest = json.loads((out / "manifest.json").read_text())
    # the two source files became one data file beside the graph, listed with its hash
    assert external_locations(out / "planner.onnx") == {"planner.onnx.data"}
    assert "planner.onnx.data" in manifest["files"]
    assert not external_locations(out / "follower.onnx")
    b = load_bundle(out, f"{key}.pub", JOINTS)
    engine = make_engine(b.model_specs()["planner"], b)
    got = engine.run({"image": np.zeros((1, 96, 96, 3), np.uint8),
                      "tokens": np.zeros((1, 16), np.int64), "q": np.zeros((1, D), np.float32)})
    assert np.allclose(got["waypoints"][0], np.linspace(0, 0.3, 10 * D).reshape(10, D))


def test_data_offsets_are_page_aligned(built: tuple[Path, Path]) -> None:
    model = onnx.load(str(built[0] / "planner.onnx"), load_external_data=False)
    offsets = [int(e.value) for t in model.graph.initializer for e in t.external_data
               if e.key == "offset"]
    assert offsets and all(o % onnx_files.ALIGN == 0 for o in offsets)


def test_a_tampered_data_file_is_refused(bundle: Path) -> None:
    with (bundle / "planner.onnx.data").open("r+b") as f:
        f.seek(16)
        f.write(b"\x7f\x7f\x7f\x7f")
    with pytest.raises(BundleError, match=r"planner\.onnx\.data: sha256 .* does not match"):
        load_bundle(bundle)


def test_a_data_file_the_manifest_does_not_list_is_refused(bundle: Path) -> None:
    """Unlisted: its hash dropped from the manifest (an unsigned bundle, hand-assembled)."""
    data = json.loads((bundle / "manifest.json").read_text())
    del data["files"]["planner.onnx.data"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"weights are in 'planner\.onnx\.data', which "
                                          r"manifest\.json does not list"):
        load_bundle(bundle)


def test_a_graph_swapped_for_one_reading_an_unlisted_file_is_refused(bundle: Path) -> None:
    """The graph is listed and re-hashed (a re-signed manifest), but points at extra.bin."""
    model = onnx.load(str(bundle / "planner.onnx"))
    onnx.save_model(model, bundle / "planner.onnx", save_as_external_data=True,
                    location="extra.bin", size_threshold=0)
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"]["planner.onnx"] = onnx_files_sha(bundle / "planner.onnx")
    (bundle / "manifest.json").write_text(json.dumps(data))
    key, _ = keygen(bundle.parent / "k2")
    sign_bundle(bundle, key)
    with pytest.raises(BundleError, match=r"weights are in 'extra\.bin'"):
        load_bundle(bundle, f"{key}.pub")


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd"])
def test_external_data_outside_the_bundle_is_refused(bundle: Path, location: str) -> None:
    model = onnx.load(str(bundle / "planner.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, bundle / "planner.onnx")
    data = json.loads((bundle / "manifest.json").read_text())
    data["files"]["planner.onnx"] = onnx_files_sha(bundle / "planner.onnx")
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match="is not a file inside the bundle"):
        load_bundle(bundle)


@pytest.mark.slow
def test_duet_export_writes_external_data_above_the_threshold(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A PyTorch export whose weights pass the threshold (here: any) keeps them beside the
    graph, in every precision variant."""
    monkeypatch.setattr(onnx_files, "EXTERNAL_MIN_BYTES", 0)
    with contextlib.redirect_stdout(io.StringIO()):
        out = export_tiny(tmp_path / "b", "fp16")
    files = json.loads((out / "manifest.json").read_text())["files"]
    assert {"planner.onnx.data", "follower.onnx.data"} <= set(files)
    assert load_bundle(out, expect_joints=JOINTS).precision() == "fp16"


def test_a_large_model_is_traced_without_its_weights_and_streams_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Above the threshold (here: any) a PyTorch module is traced without its parameters,
    which then go to external data one by one, a weight feeding a Transpose stored transposed
    (export memory): the same outputs as the exporter's own folded graph and the module,
    every weight outside the graph, no transpose of a weight left to run."""
    import onnxruntime
    import torch

    from export import onnx_export

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 300), torch.nn.GELU(),
                                torch.nn.Linear(300, 4)).eval()
    x = torch.randn(1, 5, 8)  # 3-D: a Linear exports as a MatMul by its transposed weight
    got = {}
    for limit in (1 << 40, 0):
        monkeypatch.setattr(onnx_export, "EXTERNAL_MIN_BYTES", limit)
        path = tmp_path / str(limit) / "m.onnx"
        path.parent.mkdir()
        onnx_export.export_onnx(model, (x,), ["x"], ["y"], path, "m")
        got[limit] = onnxruntime.InferenceSession(str(path)).run(None, {"x": x.numpy()})[0]
    graph = onnx.load(str(path), load_external_data=False).graph
    assert [i.name for i in graph.input] == ["x"]
    weights = {t.name for t in graph.initializer}
    assert not [n for n in graph.node if n.op_type == "Transpose" and n.input[0] in weights]
    external = [t for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    # both weights and the 300-wide bias; the 4-wide one stays inline (under 1 KiB)
    assert len(external) == 3 and {t.external_data[0].value for t in external} == {"m.onnx.data"}
    np.testing.assert_allclose(got[0], got[1 << 40], atol=1e-6)
    with torch.no_grad():
        np.testing.assert_allclose(got[0], model(x).numpy(), atol=1e-5)


def onnx_files_sha(path: Path) -> str:
    from runtime.model.bundle import sha256_file

    return sha256_file(path)


@given(st.binary(max_size=512))
@settings(max_examples=300, deadline=None)
def test_hostile_graph_bytes_are_onnx_ref_errors_never_crashes(raw: bytes) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "g.onnx"
        path.write_bytes(raw)
        try:
            assert isinstance(external_locations(path), set)
        except OnnxRefError:
            pass
