"""CLI: `duet export` (bundle from checkpoints), `duet export keygen`, `duet export check`,
`duet engines build`. Heavy imports (torch, onnx, tensorrt) happen inside the handlers."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export", help="export checkpoints to a bundle (or: keygen, check)",
        description="PyTorch planner + follower -> ONNX (fp32/fp16/int8 QDQ) bundle with "
                    "parity checks, sha256 manifest and optional ed25519 signature.")
    p.add_argument("--planner", type=Path, help="planner checkpoint (duet train)")
    p.add_argument("--follower", type=Path, help="follower checkpoint (duet train)")
    p.add_argument("--out", type=Path, help="bundle folder to write (replaced if a bundle)")
    p.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    p.add_argument("--follower-precision", choices=["fp32", "fp16", "int8"],
                   help="the follower's own precision (default: --precision)")
    p.add_argument("--int8-ops", default="Conv,MatMul,Gemm",
                   help="op types quantized in int8 (default: %(default)s)")
    p.add_argument("--config", type=Path, default=Path("configs/sim.yaml"),
                   help="robot config: joint names, limits and rates (default: %(default)s)")
    p.add_argument("--sign-key", type=Path, help="ed25519 private key (duet export keygen)")
    p.add_argument("--calib", type=int, default=64, help="calibration samples per model")
    p.add_argument("--calib-data", type=Path,
                   help=".npz of recorded observations (keys <model>/<input>); default: "
                        "calib.npz next to the planner checkpoint, else synthesised from the sim")
    p.add_argument("--parity-samples", type=int, default=8,
                   help="held-out samples per model stored in the bundle")
    p.add_argument("--tokenizer", type=Path, help="tokenizer.json (default: the planner's)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_export)
    sub = p.add_subparsers(dest="export_command", metavar="{keygen,check}")

    k = sub.add_parser("keygen", help="make an ed25519 keypair (K and K.pub)")
    k.add_argument("--out", type=Path, required=True, dest="key_out", help="private key file")
    k.set_defaults(func=_keygen)

    c = sub.add_parser("check", help="verify a bundle and rerun its parity set (on the robot)")
    c.add_argument("bundle", type=Path)
    c.add_argument("--public-key", help="ed25519 public key: the signature is then required")
    c.add_argument("--config", type=Path, dest="check_config",
                   help="robot config whose joint names the bundle must match")
    c.add_argument("--engine", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    c.add_argument("--cache", type=Path, help="TensorRT engine cache (default <bundle>/engines)")
    c.add_argument("--repeat", type=int, default=20, help="timed runs per parity sample")
    c.set_defaults(func=_check)

    e = subparsers.add_parser("engines", help="TensorRT engines for a bundle (on the target)")
    esub = e.add_subparsers(dest="engines_command", required=True, metavar="{build}")
    b = esub.add_parser("build", help="build and cache TensorRT engines (TensorRT 10+, GPU)")
    b.add_argument("--bundle", type=Path, required=True)
    b.add_argument("--precision", choices=["fp16", "int8"],
                   help="default: the bundle's precision")
    b.add_argument("--cache", type=Path, help="engine cache (default <bundle>/engines)")
    b.add_argument("--public-key", help="ed25519 public key: the signature is then required")
    b.add_argument("--force", action="store_true", help="rebuild even when cached")
    b.set_defaults(func=_engines_build)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def _export(args: argparse.Namespace) -> int:
    missing = [f"--{n}" for n in ("planner", "follower", "out") if getattr(args, n) is None]
    if missing:
        return _fail(f"duet export needs {', '.join(missing)}")
    from export.onnx_export import ExportError
    from export.pipeline import ExportOptions, export_bundle
    from export.signing import SigningError
    from runtime.config import ConfigError, load_config
    from runtime.tokenizer import Tokenizer, TokenizerError

    try:
        cfg = load_config(args.config)
        planner, follower = _load_source(args.planner), _load_source(args.follower)
        if args.tokenizer is not None:
            tokenizer = Tokenizer.load(args.tokenizer)
        else:
            tokenizer = _meta_tokenizer(planner.meta)
        for src, name in ((planner, "planner"), (follower, "follower")):
            joints = src.meta.get("joints", src.meta.get("joint_names"))
            if joints is not None and list(joints) != cfg.robot.joints:
                return _fail(f"{name} checkpoint joints {joints} != {args.config} robot.joints "
                             f"{cfg.robot.joints}")
        opts = ExportOptions(
            precision=args.precision, joints=cfg.robot.joints, planner_hz=cfg.planner.hz,
            follower_hz=cfg.follower.hz,
            dt_s=float(planner.meta.get("dt_s", 0.1)),
            lookahead_dt_s=float(follower.meta.get(
                "lookahead_dt_s", follower.meta.get("lookahead_spacing_s", 0.02))),
            lookahead=int(follower.meta.get("lookahead", 8)),
            position_min=cfg.robot.limits.position_min,
            position_max=cfg.robot.limits.position_max,
            calib=args.calib, parity_samples=args.parity_samples,
            calib_data=_calib_data(args.calib_data, args.planner),
            sign_key=args.sign_key, seed=args.seed, tokenizer=tokenizer,
            follower_precision=args.follower_precision,
            int8_ops=tuple(op.strip() for op in args.int8_ops.split(",") if op.strip()))
        out = export_bundle(planner, follower, args.out, opts)
    except (ExportError, ConfigError, SigningError, TokenizerError, ValueError) as exc:
        return _fail(str(exc))
    print(f"bundle written: {out}" + (" (signed)" if args.sign_key else ""))
    return 0


def _calib_data(given: Path | None, planner_ckpt: Path) -> Path | None:
    """--calib-data, else the calib.npz `duet train` writes next to its checkpoints, else
    None (observations are then synthesised from the sim)."""
    found = given or next((p for p in [planner_ckpt.parent / "calib.npz"] if p.is_file()), None)
    print(f"observations: {found if found else 'synthesised from the sim'}")
    return found


def _load_source(path: Path) -> Any:
    import hashlib

    from export.pipeline import Source
    from policy.models import load_checkpoint

    module, meta = load_checkpoint(path)
    return Source(module=module, meta=meta, sha256=hashlib.sha256(path.read_bytes()).hexdigest())


def _meta_tokenizer(meta: dict[str, Any]) -> Any:
    from runtime.tokenizer import Tokenizer

    spec = meta.get("tokenizer")
    if isinstance(spec, dict) and isinstance(spec.get("words"), list):
        return Tokenizer(spec["words"], max_len=int(spec.get("max_len", 16)))
    return Tokenizer()


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
    from runtime.bundle import BundleError
    from runtime.config import ConfigError, load_config
    from runtime.engines import EngineError

    try:
        joints = load_config(args.check_config).robot.joints if args.check_config else None
        ok = check_bundle(args.bundle, args.public_key, joints, args.engine, args.cache,
                          args.repeat)
    except (BundleError, ConfigError, EngineError) as exc:
        return _fail(str(exc))
    return 0 if ok else 1


def _engines_build(args: argparse.Namespace) -> int:
    from export.tensorrt_build import build_bundle_engines
    from runtime.bundle import BundleError, load_bundle
    from runtime.engines import EngineError, default_cache_dir
    from runtime.engines.tensorrt_engine import require_tensorrt

    try:
        require_tensorrt()
        bundle = load_bundle(args.bundle, args.public_key)
        cache = args.cache if args.cache is not None else default_cache_dir(bundle)
        build_bundle_engines(bundle, cache, args.precision, args.force)
    except (BundleError, EngineError) as exc:
        return _fail(str(exc))
    return 0
