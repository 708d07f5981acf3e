"""Small real ONNX models (built with onnx.helper) in a real, hashed bundle, for tests that
need the runtime stack without the trained reference policy."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sim_arm import JOINTS

from runtime.model.tokenizer import Tokenizer

H, DT, LOOK, LOOK_DT = 10, 0.1, 8, 0.02


def _planner(offsets: np.ndarray) -> onnx.ModelProto:
    """waypoints = q + offsets[k]: a plan that moves each joint by a fixed profile."""
    d = offsets.shape[1]
    nodes = [
        helper.make_node("Unsqueeze", ["q", "axis1"], ["q3"]),
        helper.make_node("Add", ["q3", "offsets"], ["waypoints"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_planner",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, [1, 96, 96, 3]),
         helper.make_tensor_value_info("tokens", TensorProto.INT64, [1, 16]),
         helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, d])],
        [helper.make_tensor_value_info("waypoints", TensorProto.FLOAT, [1, H, d])],
        [numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"),
         numpy_helper.from_array(offsets[None].astype(np.float32), "offsets")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _slow_planner(offsets: np.ndarray, iterations: int) -> onnx.ModelProto:
    """`_planner` that first spins `iterations` steps of x = tanh(x W) (a Loop node): a planner
    as slow as a real-size one, whose call ONNX Runtime can interrupt between two steps."""
    n = 64
    body = helper.make_graph(
        [helper.make_node("MatMul", ["x_in", "w"], ["y"]),
         helper.make_node("Tanh", ["y"], ["x_out"]),
         helper.make_node("Identity", ["cond_in"], ["cond_out"])], "spin",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_in", TensorProto.FLOAT, [1, n])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("x_out", TensorProto.FLOAT, [1, n])])
    model = _planner(offsets)
    g = model.graph
    unsqueeze, add = list(g.node)
    add.input[0] = "q3_spun"  # the Add reads q3 + 0 * sum(x): x is a real dependency
    del g.node[:]
    g.node.extend([
        unsqueeze,
        helper.make_node("Loop", ["trips", "yes", "x0"], ["x"], body=body),
        helper.make_node("ReduceSum", ["x"], ["x_sum"], keepdims=0),
        helper.make_node("Mul", ["x_sum", "zero"], ["nothing"]),
        helper.make_node("Add", ["q3", "nothing"], ["q3_spun"]),
        add])
    rng = np.random.default_rng(0)
    g.initializer.extend([
        numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "yes"),
        numpy_helper.from_array(np.full((1, n), 0.5, dtype=np.float32), "x0"),
        numpy_helper.from_array((rng.standard_normal((n, n)) / 8).astype(np.float32), "w"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero")])
    onnx.checker.check_model(model)
    return model


def _follower(d: int, gain: float) -> onnx.ModelProto:
    """residual = gain * (mean(ref over the window) - q)."""
    nodes = [
        helper.make_node("ReduceMean", ["ref"], ["mean"], axes=[1], keepdims=0),
        helper.make_node("Sub", ["mean", "q"], ["err"]),
        helper.make_node("Mul", ["err", "gain"], ["residual"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_follower",
        [helper.make_tensor_value_info("ref", TensorProto.FLOAT, [1, LOOK, d]),
         helper.make_tensor_value_info("q", TensorProto.FLOAT, [1, d]),
         helper.make_tensor_value_info("dq", TensorProto.FLOAT, [1, d])],
        [helper.make_tensor_value_info("residual", TensorProto.FLOAT, [1, d])],
        [numpy_helper.from_array(np.array(gain, dtype=np.float32), "gain")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


REFERENCE_CONTRACT = {
    "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
    "planner": {
        "stages": [{"name": "planner", "file": "planner.onnx", "inputs": [
            {"role": "camera", "name": "image", "camera": "scene", "height": 96, "width": 96},
            {"role": "instruction", "name": "tokens", "tokenizer": "tokenizer.json",
             "kind": "duet-words", "max_len": 16},
            {"role": "proprio", "name": "q", "field": "q"}],
            "outputs": [{"role": "actions", "name": "waypoints"}]}],
        "actions": {"horizon": H, "dt_s": DT, "kind": "absolute", "joints": JOINTS}},
    "follower": {"file": "follower.onnx", "inputs": [
        {"role": "reference", "name": "ref", "steps": LOOK, "dt_s": LOOK_DT},
        {"role": "proprio", "name": "q", "field": "q"},
        {"role": "proprio", "name": "dq", "field": "dq"}],
        "output": {"name": "residual"}},
}


def make_bundle(out: Path, offsets: np.ndarray | None = None, gain: float = 0.0,
                joints: list[str] = JOINTS, slow_iterations: int = 0,
                latency: dict[str, object] | None = None) -> Path:
    """A complete format-2 bundle, made by the exporter's own `bundle_from_onnx` from two
    small ONNX graphs and the reference contract; `offsets` [H, D] default: a slow sweep
    of the base joint. `slow_iterations`: the planner spins that long first (a slow
    planner); `latency`: the contract's declared `planner.latency`."""
    import copy

    import yaml

    from export.pipeline import ExportOptions, bundle_from_onnx, load_contract

    d = len(joints)
    if offsets is None:
        offsets = np.zeros((H, d))
        offsets[:, 0] = 0.03 * (np.arange(H) + 1)
    src = out.with_name(out.name + ".src")
    src.mkdir(parents=True, exist_ok=True)
    onnx.save(_slow_planner(offsets, slow_iterations) if slow_iterations else
              _planner(offsets), src / "planner.onnx")
    onnx.save(_follower(d, gain), src / "follower.onnx")
    Tokenizer().save(src / "tokenizer.json")
    contract = copy.deepcopy(REFERENCE_CONTRACT)
    contract["planner"]["actions"]["joints"] = list(joints)  # type: ignore[index]
    if latency is not None:
        contract["planner"]["latency"] = latency  # type: ignore[index]
    (src / "contract.yaml").write_text(yaml.safe_dump(contract))
    opts = ExportOptions(calib=4, parity_samples=2)
    with contextlib.redirect_stdout(io.StringIO()):  # the parity table: not test output
        bundle_from_onnx(load_contract(src / "contract.yaml"), out, opts, src)
    return out


def respin(bundle: Path, iterations: int) -> Path:
    """The slow planner of `bundle` made to spin `iterations` steps, its hash updated in the
    (unsigned) manifest: a planner too slow to export (parity would run it) built by hand."""
    import json

    from runtime.model.bundle import MANIFEST, sha256_file

    path = bundle / "planner.onnx"
    model = onnx.load(path)
    trips = next(t for t in model.graph.initializer if t.name == "trips")
    trips.CopyFrom(numpy_helper.from_array(np.array(iterations, dtype=np.int64), "trips"))
    onnx.save(model, path)
    manifest = json.loads((bundle / MANIFEST).read_text())
    manifest["files"]["planner.onnx"] = sha256_file(path)
    (bundle / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return bundle
