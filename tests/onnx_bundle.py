"""Small real ONNX models (built with onnx.helper) in a real, hashed bundle, for tests that
need the runtime stack without the trained reference policy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from runtime.bundle import FORMAT_VERSION, sha256_file
from runtime.tokenizer import Tokenizer

JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper"]
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


def make_bundle(out: Path, offsets: np.ndarray | None = None, gain: float = 0.0,
                joints: list[str] = JOINTS) -> Path:
    """Write a complete bundle; `offsets` [H, D] default: a slow sweep of the base joint."""
    d = len(joints)
    if offsets is None:
        offsets = np.zeros((H, d))
        offsets[:, 0] = 0.03 * (np.arange(H) + 1)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(_planner(offsets), out / "planner.onnx")
    onnx.save(_follower(d, gain), out / "follower.onnx")
    Tokenizer().save(out / "tokenizer.json")

    def io(name: str, dtype: str, shape: list[int]) -> dict[str, object]:
        return {"name": name, "dtype": dtype, "shape": shape}

    files = {n: sha256_file(out / n) for n in ("planner.onnx", "follower.onnx", "tokenizer.json")}
    manifest = {
        "format_version": FORMAT_VERSION, "version": "test",
        "robot": {"joints": joints},
        "models": {
            "planner": {"file": "planner.onnx", "precision": "fp32",
                        "inputs": [io("image", "uint8", [1, 96, 96, 3]),
                                   io("tokens", "int64", [1, 16]), io("q", "float32", [1, d])],
                        "outputs": [io("waypoints", "float32", [1, H, d])]},
            "follower": {"file": "follower.onnx", "precision": "fp32",
                         "inputs": [io("ref", "float32", [1, LOOK, d]), io("q", "float32", [1, d]),
                                    io("dq", "float32", [1, d])],
                         "outputs": [io("residual", "float32", [1, d])]},
        },
        "rates": {"planner_hz": 5.0, "follower_hz": 500.0},
        "horizon": H, "dt_s": DT, "lookahead": {"steps": LOOK, "dt_s": LOOK_DT},
        "normalisation": "none (test graphs)", "tokenizer": "tokenizer.json",
        "files": files,
        "provenance": {"tool": "tests/onnx_bundle.py", "tool_version": "0", "opset": 17,
                       "checkpoints": {}, "created": "2026-01-01T00:00:00Z"},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out
