"""The export stage: trained PyTorch planner + follower -> a verified (optionally signed) bundle.

fp32 ONNX (checked, shape-inferred) -> fp16 / int8 QDQ when asked -> parity against PyTorch
on held-out observations (refused above tolerance) -> tokenizer, parity set, manifest with
sha256 of every file -> signature. The bundle is assembled in a scratch folder next to `out`
and moved into place only when every check passed.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
import torch

from export import calibration as calib
from export.onnx_export import IO_NAMES, OPSET, ExportError, export_onnx
from export.parity import TOLERANCES, ParityResult, format_table, measure, save_parity
from export.precision import QUANTIZABLE_OPS, to_fp16, to_int8
from export.signing import sign_bundle
from runtime.bundle import (
    FORMAT_VERSION,
    MANIFEST,
    Lookahead,
    Manifest,
    Models,
    ModelSpec,
    ParitySpec,
    Provenance,
    Rates,
    RobotSpec,
    load_bundle,
    sha256_file,
)
from runtime.engines.onnxruntime_engine import OnnxRuntimeEngine
from runtime.tokenizer import Tokenizer

TOKENIZER_FILE = "tokenizer.json"
PARITY_FILE = "parity.npz"
NORMALISATION = (
    "Baked into both graphs. planner: image uint8 RGB HWC as rendered (x/255, ImageNet "
    "mean/std inside), tokens = tokenizer.json ids (0 = pad), q in rad; waypoints are absolute "
    "joint targets (rad) at t_obs + (k+1)*dt_s. follower: ref = reference at t + (i+1)*"
    "lookahead.dt_s (rad), q (rad), dq (rad/s); residual (rad) is added to the next command."
)


@dataclass
class Source:
    """A model to export: the module, its checkpoint meta and the checkpoint file's sha256."""

    module: torch.nn.Module
    meta: dict[str, Any] = field(default_factory=dict)
    sha256: str = "0" * 64


@dataclass
class ExportOptions:
    precision: str
    joints: list[str]
    planner_hz: float
    follower_hz: float
    dt_s: float = 0.1
    lookahead: int = 8  # follower reference window length (contract: 8 at 0.02 s)
    lookahead_dt_s: float = 0.02
    position_min: list[float] | None = None
    position_max: list[float] | None = None
    calib: int = 64  # calibration samples per model (int8)
    parity_samples: int = 8  # held-out samples per model, stored in the bundle
    calib_data: Path | None = None  # .npz of recorded observations; None = synthesise
    sign_key: Path | None = None
    seed: int = 0
    tokenizer: Tokenizer = field(default_factory=Tokenizer)
    # The follower's own precision (None: `precision`). A follower MLP runs in ~15 µs in
    # fp32; int8 buys it nothing and costs accuracy on the motor path.
    follower_precision: str | None = None
    int8_ops: tuple[str, ...] = QUANTIZABLE_OPS

    def precision_of(self, kind: str) -> str:
        if kind == "follower" and self.follower_precision is not None:
            return self.follower_precision
        return self.precision


def contract_inputs(kind: str, joints: int, lookahead: int, max_tokens: int
                    ) -> tuple[torch.Tensor, ...]:
    """Batch-1 tracing inputs with the contract's shapes and dtypes."""
    if kind == "planner":
        return (torch.zeros(1, 96, 96, 3, dtype=torch.uint8),
                torch.zeros(1, max_tokens, dtype=torch.int64), torch.zeros(1, joints))
    return torch.zeros(1, lookahead, joints), torch.zeros(1, joints), torch.zeros(1, joints)


def _observations(kind: str, engine: OnnxRuntimeEngine, n: int, opts: ExportOptions
                  ) -> calib.Samples:
    specs = engine.input_specs
    if opts.calib_data is not None:
        return calib.load_npz(opts.calib_data, kind, specs)
    d = len(opts.joints)
    if kind == "planner":
        samples = calib.synth_planner(n, opts.seed, list(opts.tokenizer.words),
                                      opts.tokenizer.max_len)
    else:
        lo = np.asarray(opts.position_min if opts.position_min else [-1.0] * d)
        hi = np.asarray(opts.position_max if opts.position_max else [1.0] * d)
        samples = calib.synth_follower(n, d, opts.lookahead, opts.lookahead_dt_s, opts.seed,
                                       lo, hi)
    return calib.check_samples(samples, specs, f"synthesised {kind} observations")


def _torch_reference(module: torch.nn.Module, kind: str, inputs: calib.Samples
                     ) -> dict[str, np.ndarray]:
    in_names, out_names = IO_NAMES[kind]
    with torch.no_grad():
        out = module(*(torch.from_numpy(inputs[name]) for name in in_names))
    return {out_names[0]: out.numpy().astype(np.float32)}


def _export_model(kind: str, src: Source, work: Path, opts: ExportOptions
                  ) -> tuple[Path, list[ParityResult], calib.Samples, dict[str, np.ndarray]]:
    d = len(opts.joints)
    fp32 = work / f"{kind}.fp32.onnx"
    export_onnx(src.module, kind,
                contract_inputs(kind, d, opts.lookahead, opts.tokenizer.max_len), fp32)
    fp32_engine = OnnxRuntimeEngine(fp32)
    n_parity = opts.parity_samples
    data = _observations(kind, fp32_engine, opts.calib + n_parity, opts)
    total = calib.count(data)
    if total <= n_parity:
        raise ExportError(f"{kind}: {total} observations; need more than {n_parity} "
                          "(held-out parity samples + calibration)")
    held_out = calib.take(data, slice(total - n_parity, total))
    calibration = calib.take(data, slice(0, min(opts.calib, total - n_parity)))
    reference = _torch_reference(src.module, kind, held_out)

    results = [measure(kind, fp32_engine, held_out, reference, TOLERANCES["fp32"][kind])]
    precision = opts.precision_of(kind)
    final = work / f"{kind}.{precision}.onnx" if precision != "fp32" else fp32
    if precision == "fp16":
        to_fp16(fp32, final)
    elif precision == "int8":
        to_int8(fp32, final, calibration, opts.int8_ops)
    if final != fp32:
        results.append(measure(kind, OnnxRuntimeEngine(final), held_out, reference,
                               TOLERANCES[precision][kind]))
    results[0].model = f"{kind} fp32"
    results[-1].model = f"{kind} {precision}" if final != fp32 else results[0].model
    return final, results, held_out, reference


def _version_string() -> str:
    try:
        return metadata.version("duet-runtime")
    except metadata.PackageNotFoundError:
        return "unknown"


def export_bundle(planner: Source, follower: Source, out: Path, opts: ExportOptions) -> Path:
    """Write a verified bundle to `out` (replacing a bundle already there); return `out`."""
    for given in (opts.precision, opts.follower_precision):
        if given is not None and given not in TOLERANCES:
            raise ExportError(f"precision {given!r}: expected fp32, fp16 or int8")
    unknown = set(opts.int8_ops) - set(QUANTIZABLE_OPS)
    if unknown or not opts.int8_ops:
        raise ExportError(f"int8 op types {sorted(opts.int8_ops)}: expected a non-empty "
                          f"subset of {', '.join(QUANTIZABLE_OPS)}")
    if out.exists() and not (out / MANIFEST).is_file():
        raise ExportError(f"{out}: exists and is not a bundle; refusing to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:
        work, staged = Path(tmp) / "work", Path(tmp) / "bundle"
        work.mkdir()
        staged.mkdir()
        specs: dict[str, ModelSpec] = {}
        parity: dict[str, tuple[dict[str, np.ndarray], dict[str, np.ndarray]]] = {}
        results: list[ParityResult] = []
        for kind, src in (("planner", planner), ("follower", follower)):
            onnx_path, res, held_out, reference = _export_model(kind, src, work, opts)
            results += res
            name = f"{kind}.onnx"
            shutil.copyfile(onnx_path, staged / name)
            engine = OnnxRuntimeEngine(staged / name)
            specs[kind] = ModelSpec(file=name, precision=opts.precision_of(kind),
                                    inputs=engine.input_specs, outputs=engine.output_specs)
            parity[kind] = (held_out, reference)
        print(format_table(results, f"parity vs PyTorch fp32 ({opts.precision} export)"))
        failed = [r.model for r in results if not r.ok]
        if failed:
            raise ExportError(f"parity above tolerance for {', '.join(failed)}; no bundle written")

        opts.tokenizer.save(staged / TOKENIZER_FILE)
        save_parity(staged / PARITY_FILE, parity)
        waypoints = specs["planner"].output("waypoints").shape
        ref = specs["follower"].input("ref").shape
        created = datetime.now(timezone.utc)
        files = {p.name: sha256_file(p) for p in sorted(staged.iterdir())}
        manifest = Manifest(
            format_version=FORMAT_VERSION,
            version=f"{created:%Y%m%d-%H%M%S}-{opts.precision}-{files['planner.onnx'][:8]}",
            robot=RobotSpec(joints=list(opts.joints)),
            models=Models(planner=specs["planner"], follower=specs["follower"]),
            rates=Rates(planner_hz=opts.planner_hz, follower_hz=opts.follower_hz),
            horizon=waypoints[1],
            dt_s=opts.dt_s,
            lookahead=Lookahead(steps=ref[1], dt_s=opts.lookahead_dt_s),
            normalisation=NORMALISATION,
            tokenizer=TOKENIZER_FILE,
            parity=ParitySpec(file=PARITY_FILE, max_abs={
                kind: TOLERANCES[spec.precision][kind] for kind, spec in specs.items()}),
            files=files,
            provenance=Provenance(
                tool="duet export", tool_version=_version_string(), opset=OPSET,
                torch_version=torch.__version__, onnxruntime_version=onnxruntime.__version__,
                checkpoints={"planner": planner.sha256, "follower": follower.sha256},
                created=created.isoformat(timespec="seconds"),
            ),
        )
        (staged / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
        if opts.sign_key is not None:
            sign_bundle(staged, opts.sign_key)
        load_bundle(staged, expect_joints=opts.joints)  # the robot's own checks, before moving
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out
