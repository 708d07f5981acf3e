"""`duet export check`: the parity report a technician reruns on the robot.

Loads the bundle through the robot's own checks (hashes, signature, joints), runs each model
on the reference inputs stored in parity.npz with the chosen engine, and compares with the
fp32 PyTorch outputs recorded at export. No torch, no onnx: robot dependencies only.
"""

from __future__ import annotations

from pathlib import Path

from export.parity import ParityResult, format_table, judges, load_parity, measure
from runtime.model.bundle import BundleError, load_bundle
from runtime.model.engines import EngineKind, make_engine


def check_bundle(path: Path, public_key: str | None, joints: list[str] | None,
                 engine: EngineKind = "onnxruntime", cache_dir: Path | None = None,
                 repeat: int = 20) -> bool:
    bundle = load_bundle(path, public_key, joints)
    m = bundle.manifest
    print(f"bundle {bundle.path} version {m.version}: hashes ok, signature "
          f"{'ok' if bundle.signed else 'not checked (no public key)'}, joints "
          f"{'ok' if joints is not None else 'not checked (no config)'}")
    if m.parity is None or bundle.parity_path is None:
        raise BundleError(f"{bundle.path}: manifest has no parity set to check against")
    data = load_parity(bundle.parity_path)
    results: list[ParityResult] = []
    for name, spec in bundle.model_specs().items():
        if name not in data:
            raise BundleError(f"{bundle.parity_path}: no reference data for {name}")
        eng = make_engine(spec, bundle, engine, cache_dir=cache_dir)
        inputs, reference = data[name]
        judge = judges(bundle.contract.output_roles(name), m.parity.max_abs[name],
                       m.parity.max_rel.get(name))
        results += measure(f"{name} {spec.precision}", eng, inputs, reference, judge,
                           repeat=repeat)
    print(format_table(results, f"parity vs the source model ({engine})"))
    ok = all(r.ok for r in results)
    print("PASS" if ok else "FAIL: above tolerance")
    return ok
