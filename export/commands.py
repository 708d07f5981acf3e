"""CLI: `duet export` (bundle from checkpoints), `duet export keygen`, `duet export check`,
`duet engines build`. Heavy imports (torch, onnx, tensorrt) happen inside the handlers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from runtime.commands.options import subcommand


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers, "export",
        "export PyTorch models + a contract to a bundle (or: keygen, check)",
        "duet export --module policy.reference:modules --checkpoint runs/ck "
        "--contract policy/reference_contract.yaml --assets runs/ck --out runs/bundle",
        description="Any PyTorch model + a model contract YAML -> ONNX (fp32/fp16/int8 QDQ) "
                    "bundle with parity checks, a sha256 manifest and an optional ed25519 "
                    "signature.")
    p.add_argument("--module", help="package.module:factory returning the models: a "
                   "torch.nn.Module (a one-stage planner) or {stage name | 'follower': module}")
    p.add_argument("--checkpoint", type=Path, help="passed to the factory (file or folder)")
    p.add_argument("--contract", type=Path, help="the model contract (YAML)")
    p.add_argument("--assets", type=Path, help="where the contract's other files (tokenizers)"
                   " are (default: the contract's folder)")
    p.add_argument("--out", type=Path, help="bundle folder to write (replaced if a bundle)")
    _common_export_args(p)
    p.set_defaults(func=_export)
    sub = p.add_subparsers(dest="export_command", metavar="{keygen,check}")

    k = subcommand(sub, "keygen", "make an ed25519 keypair (K and K.pub)",
                   "duet export keygen --out keys/duet")
    k.add_argument("--out", type=Path, required=True, dest="key_out", help="private key file")
    k.set_defaults(func=_keygen)

    c = subcommand(sub, "check", "verify a bundle and rerun its parity set (on the robot)",
                   "duet export check /var/lib/duet/bundles/current")
    c.add_argument("bundle", type=Path)
    c.add_argument("--public-key", help="ed25519 public key: the signature is then required")
    c.add_argument("--config", type=Path, dest="check_config",
                   help="robot config whose joint names the bundle must match")
    c.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    c.add_argument("--cache", type=Path, help="TensorRT engine cache "
                   "(default /var/lib/duet/engines)")
    c.add_argument("--repeat", type=int, default=20, help="timed runs per parity sample")
    c.set_defaults(func=_check)

    e = subcommand(subparsers, "engines", "TensorRT engines for a bundle (on the target)",
                   "duet engines build --bundle /var/lib/duet/bundles/current")
    esub = e.add_subparsers(dest="engines_command", required=True, metavar="{build}")
    b = subcommand(esub, "build", "build and cache TensorRT engines (TensorRT 10+, GPU)",
                   "duet engines build --bundle /var/lib/duet/bundles/current")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--precision", choices=["fp16", "bf16", "int8"],
                   help="default: each model's precision in the bundle (bf16: Ampere/Orin)")
    b.add_argument("--cache", type=Path, help="engine cache (default /var/lib/duet/engines; "
                   "root-owned: engines are code)")
    b.add_argument("--public-key", help="ed25519 public key: the signature is then required")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.set_defaults(func=_engines_build)


def register_bundle_create(bundle_actions: Any) -> None:
    """`duet bundle create`: an action of the runtime's `duet bundle` that needs onnx."""
    bc = subcommand(
        bundle_actions, "create", "wrap ONNX files you already have into a verified bundle",
        "duet bundle create --contract my_policy.yaml --out bundles/mine --reference ref.npz",
        description="ONNX files + a model contract YAML (whose `file:` entries name them, "
                    "relative to it) -> a bundle, with the same checks as `duet export`.")
    bc.add_argument("--contract", type=Path, required=True)
    bc.add_argument("--out", type=Path, required=True)
    bc.add_argument("--assets", type=Path, help="where the ONNX files and tokenizers are "
                    "(default: the contract's folder)")
    bc.add_argument("--reference", type=Path, help=".npz of inputs and outputs the models "
                    "must reproduce: <model>/in/<input>, <model>/out/<output>")
    _common_export_args(bc)
    bc.set_defaults(func=_bundle_create)


def _common_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--precision", default="fp32",
                   help="every model's (fp32, fp16, int8 = QDQ, int8w / int4w = weight-only "
                        "MatMul blocks + int8 embeddings), or per model: "
                        "prefix=int8w,expert=fp32,follower=fp32 (models not named: fp32; "
                        "default: %(default)s)")
    p.add_argument("--follower-precision", choices=["fp32", "fp16", "int8", "int8w", "int4w"],
                   help="the follower's own precision (default: --precision)")
    p.add_argument("--int8-ops", default="Conv,MatMul,Gemm",
                   help="op types quantized in int8 (default: %(default)s)")
    p.add_argument("--sign-key", type=Path, help="ed25519 private key (duet export keygen)")
    p.add_argument("--calib", type=int, default=64, help="calibration samples per model")
    p.add_argument("--calib-data", type=Path,
                   help=".npz of recorded observations, keys <model>/<input> (default: "
                        "calib.npz among the assets, else synthesised from the contract)")
    p.add_argument("--parity-samples", type=int, default=8,
                   help="held-out samples per model stored in the bundle")
    p.add_argument("--seed", type=int, default=0)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _options(args: argparse.Namespace, assets: Path) -> Any:
    from export.pipeline import ExportOptions, parse_precision

    precision, per_model = parse_precision(args.precision)
    calib = args.calib_data or (assets / "calib.npz" if (assets / "calib.npz").is_file()
                                else None)
    print(f"observations: {calib if calib else 'synthesised from the contract'}")
    return ExportOptions(
        precision=precision, models=per_model, follower_precision=args.follower_precision,
        int8_ops=tuple(op.strip() for op in args.int8_ops.split(",") if op.strip()),
        calib=args.calib, parity_samples=args.parity_samples, calib_data=calib,
        sign_key=args.sign_key, seed=args.seed)


def load_factory(spec: str, checkpoint: Path | None, contract: Any) -> dict[str, Any]:
    """`package.module:factory` -> {model name: torch.nn.Module}."""
    import importlib
    import os

    import torch

    from export.onnx_export import ExportError

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ExportError(f"--module {spec!r}: expected package.module:factory")
    if os.getcwd() not in sys.path:  # the user's own package, as `python -c` would find it
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ExportError(f"--module {spec!r}: {exc}") from None
    got = factory(checkpoint) if checkpoint is not None else factory()
    if isinstance(got, torch.nn.Module):
        stages = [s.name for s in contract.planner.stages]
        if len(stages) != 1:  # (a follower may be the ONNX file the contract names)
            raise ExportError(f"--module {spec}: returned one module; the contract's planner "
                              f"has stages {stages}")
        return {stages[0]: got}
    if isinstance(got, dict) and all(isinstance(m, torch.nn.Module) for m in got.values()):
        return dict(got)
    raise ExportError(f"--module {spec}: the factory returned {type(got).__name__}, expected "
                      "a torch.nn.Module or a dict of them")


def _export(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("module", "contract", "out") if getattr(args, n) is None]
    if missing:
        return _fail(f"duet export needs {', '.join(missing)}")
    import hashlib

    from export.calibration import CalibrationError
    from export.onnx_export import ExportError
    from export.pipeline import export_bundle, load_contract
    from export.signing import SigningError

    try:
        contract = load_contract(args.contract)
        assets = args.assets or args.contract.parent
        opts = _options(args, assets)
        if args.checkpoint is not None and args.checkpoint.is_file():
            opts.checkpoints = {"checkpoint": hashlib.sha256(
                args.checkpoint.read_bytes()).hexdigest()}
        elif args.checkpoint is not None:
            opts.checkpoints = {p.stem: hashlib.sha256(p.read_bytes()).hexdigest()
                                for p in sorted(args.checkpoint.glob("*.pt"))}
        # not kept here: the exporter drops each module once its outputs are recorded
        out = export_bundle(contract, load_factory(args.module, args.checkpoint, contract),
                            args.out, opts, assets)
    except (ExportError, SigningError, CalibrationError, ValueError) as exc:
        return _fail(str(exc))
    print(f"bundle written: {out}" + (" (signed)" if args.sign_key else ""))
    return 0


def _bundle_create(args: argparse.Namespace) -> int:
    from export.calibration import CalibrationError
    from export.onnx_export import ExportError
    from export.pipeline import bundle_from_onnx, load_contract
    from export.signing import SigningError

    try:
        contract = load_contract(args.contract)
        assets = args.assets or args.contract.parent
        out = bundle_from_onnx(contract, args.out, _options(args, assets), assets,
                               args.reference)
    except (ExportError, SigningError, CalibrationError, ValueError) as exc:
        return _fail(str(exc))
    print(f"bundle written: {out}" + (" (signed)" if args.sign_key else ""))
    return 0


def _keygen(args: argparse.Namespace) -> int:
    from export.signing import SigningError, keygen

    try:
        private, public = keygen(args.key_out)
    except SigningError as exc:
        return _fail(str(exc))
    print(f"private key: {private} (keep it off the robot)\npublic key:  {public}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from export.check import check_bundle
    from runtime.config import ConfigError, load_config
    from runtime.model.bundle import BundleError
    from runtime.model.engines import EngineError

    try:
        joints = load_config(args.check_config).robot.joints if args.check_config else None
        ok = check_bundle(args.bundle, args.public_key, joints, args.engine, args.cache,
                          args.repeat)
    except (BundleError, ConfigError, EngineError) as exc:
        return _fail(str(exc))
    return 0 if ok else 1


def _engines_build(args: argparse.Namespace) -> int:
    from export.tensorrt_build import build_bundle_engines
    from runtime.model.bundle import BundleError, load_bundle
    from runtime.model.engines import DEFAULT_ENGINE_CACHE, EngineError
    from runtime.model.engines.tensorrt_engine import require_tensorrt

    try:
        require_tensorrt()
        bundle = load_bundle(args.bundle, args.public_key)
        cache = args.cache if args.cache is not None else Path(DEFAULT_ENGINE_CACHE)
        build_bundle_engines(bundle, cache, args.precision, args.force)
    except (BundleError, EngineError) as exc:
        return _fail(str(exc))
    return 0
