"""A bundle with another follower: the same planner (its files, precision and parity as they
were exported), and the follower a robot's owner chose: none (reference tracking), the
model-free one from its identification, or a learned one (policy/tracking_followers.py).

The planner is not re-exported: a quantized planner stays bit-identical and keeps its label.
The new follower is checked like any export: its graph against the contract, its outputs
against the PyTorch source on held-out samples (stored as the bundle's parity), and the
whole bundle through the robot's own `load_bundle` before it is moved into place.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

from export.onnx_export import OPSET, ExportError
from export.parity import TOLERANCES, load_parity, save_parity
from export.seal import seal
from runtime.model.bundle import (
    ManifestV2,
    Provenance,
    load_bundle,
)
from runtime.model.contract import Contract
from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine

FOLLOWER_FILE = "follower.onnx"
Source = Callable[[dict[str, np.ndarray]], np.ndarray]  # inputs -> the source's residual


def with_follower(base: Path, out: Path, label: str, follower: Path | None = None,
                  source: Source | None = None, samples: dict[str, np.ndarray] | None = None,
                  lookahead: int = 8, lookahead_dt: float = 0.02, tool: str = "duet",
                  sign_key: Path | None = None) -> Path:
    """`base` bundle with `follower` (an ONNX file: ref [1, L, J], q, dq -> residual), or
    none; `source` and `samples` (ref/q/dq arrays, a few held out) give its parity."""
    bundle = load_bundle(base)
    manifest = bundle.manifest  # format 1 or 2: the new one is written in format 2
    data = bundle.contract.model_dump(mode="json")
    old = bundle.contract.follower
    # the inputs the graph has: an exporter drops what a model does not read (the model-free
    # follower reads the reference alone), and the robot refuses a contract naming others
    takes = _graph_inputs(follower) if follower is not None else set()
    data["follower"] = None if follower is None else {
        "file": FOLLOWER_FILE, "precision": "fp32",
        "joints": old.joints if old is not None else None,
        "inputs": [{"role": "reference", "name": "ref", "steps": lookahead,
                    "dt_s": lookahead_dt}]
        + [{"role": "proprio", "name": k, "field": k} for k in ("q", "dq") if k in takes],
        "output": {"name": "residual"}}
    contract = Contract.model_validate(data)
    parity = load_parity(bundle.parity_path) if bundle.parity_path else {}
    parity.pop("follower", None)
    max_abs = dict(manifest.parity.max_abs) if manifest.parity else {}
    max_abs.pop("follower", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        staged = Path(tmp) / "bundle"
        staged.mkdir()
        dropped = {old.file} if old is not None else set()
        for name in manifest.files:
            if name not in dropped:
                (staged / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(base / name, staged / name)
        if follower is not None:
            shutil.copyfile(follower, staged / FOLLOWER_FILE)
            if source is None or samples is None:
                raise ExportError("a new follower needs its source and samples for parity")
            # one sample at a time, with the batch of 1 the follower runs with (the engine
            # reuses its output buffer: each result is copied)
            ins = {k: np.ascontiguousarray(samples[k][:, None], dtype=np.float32)
                   for k in ("ref", "q", "dq") if k == "ref" or k in takes}
            engine = OnnxRuntimeEngine(staged / FOLLOWER_FILE)
            got = np.concatenate([engine.run({k: v[i] for k, v in ins.items()})["residual"].copy()
                                  for i in range(len(ins["ref"]))])
            want = source({k: samples[k] for k in ("ref", "q", "dq")})
            err = float(np.abs(got - want).max())
            tol = TOLERANCES["fp32"]["follower"]
            if not err <= tol:
                raise ExportError(f"follower parity {err:.2e} above {tol:.0e}; no bundle written")
            parity["follower"] = ({k: v[:, 0] for k, v in ins.items()},
                                  {"residual": want.astype(np.float64)})
            max_abs["follower"] = tol
        parity_spec = manifest.parity
        if parity_spec is not None:
            save_parity(staged / parity_spec.file, parity)
            parity_spec = parity_spec.model_copy(update={"max_abs": max_abs})

        def manifest_for(files: dict[str, str], created: datetime) -> ManifestV2:
            tag = files[FOLLOWER_FILE][:8] if follower is not None else "none"
            return ManifestV2(
                format_version=2, version=f"{manifest.version}+{label}-{tag}"[:200],
                contract=contract, parity=parity_spec, files=files,
                provenance=Provenance(
                    tool=tool, tool_version=manifest.provenance.tool_version, opset=OPSET,
                    torch_version=manifest.provenance.torch_version,
                    onnxruntime_version=manifest.provenance.onnxruntime_version,
                    checkpoints=dict(manifest.provenance.checkpoints),
                    created=created.isoformat(timespec="seconds")))

        return seal(staged, out, manifest_for, sign_key)


def _graph_inputs(path: Path) -> set[str]:
    import onnx

    return {i.name for i in onnx.load(str(path), load_external_data=False).graph.input}
