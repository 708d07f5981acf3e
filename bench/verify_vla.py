"""`make verify-vla`: a real-size (≥ 0.6 B parameters, > 2 GB in fp32) π0/SmolVLA-shaped
planner with random weights (bench/vla_model.py) through the whole path: export with a
precision per stage, bundle (external data), verify, the planner's latency per stage, then
30 s live on the sim with the plan timeout derived from that latency.

    .venv/bin/python -m bench.verify_vla [--out runs/verify-vla] [--prefix int8w] [--small]

Prints the parameters, export wall time and peak RSS (this process: the PyTorch model
included) against the fp32 weights, parity per stage and per output and the final chunk in
radians (from the exporter), size per file, verify time (hashing, then the boot's stamp),
planner latency per stage, and the live run's plans, tracked ticks and outcome. `--small`:
the same shapes with 2 decoder layers (a minute, to check the script). Needs ~8 GB of RAM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper"]


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # KiB -> GB


def export(out: Path, prefix: str, small: bool, dt_s: float) -> float:
    """The bundle; returns the fp32 weight bytes."""
    import yaml

    from bench.vla_model import VlaShape, contract, count, modules
    from export.pipeline import ExportOptions, export_bundle, load_contract, parse_precision
    from runtime.model.tokenizer import Tokenizer

    shape = VlaShape(layers=2) if small else VlaShape()
    src = out.with_name(out.name + ".src")
    src.mkdir(parents=True, exist_ok=True)
    (src / "contract.yaml").write_text(yaml.safe_dump(contract(shape, dt_s)))
    Tokenizer().save(src / "tokenizer.json")
    models = modules(shape)
    params = {k: count(m) for k, m in models.items()}
    weights = 4.0 * sum(params.values())
    over = "over" if 4 * params["prefix"] > 2**31 else "under"
    print(f"planner: {', '.join(f'{k} {v / 1e6:.1f} M' for k, v in params.items())} = "
          f"{sum(params.values()) / 1e6:.1f} M parameters, {weights / 1e9:.2f} GB in fp32 "
          f"(prefix {4 * params['prefix'] / 1e9:.2f} GB: {over} protobuf's 2 GiB)", flush=True)
    default, per = parse_precision(f"prefix={prefix},expert=fp32")
    opts = ExportOptions(precision=default, models=per, calib=2, parity_samples=2,
                         parity_repeat=1)
    rss0 = _rss_gb()
    t0 = time.monotonic()
    export_bundle(load_contract(src / "contract.yaml"), models, out, opts, src)
    del models  # the exporter dropped each module once its outputs were recorded
    wall = time.monotonic() - t0
    print(f"\nexport: {wall:.0f} s wall; peak RSS {_rss_gb():.2f} GB (before export "
          f"{rss0:.2f} GB, the PyTorch model) = {_rss_gb() * 1e9 / weights:.2f}x the fp32 "
          "weights", flush=True)
    return weights


def sizes(out: Path) -> None:
    print("\nbundle files:")
    for p in sorted(out.iterdir()):
        print(f"  {p.name:<24} {p.stat().st_size / 1e6:>10.1f} MB")


def verify(out: Path) -> None:
    from runtime.model.bundle import load_bundle

    for label in ("first load (hashes every file)", "second load"):
        t0 = time.monotonic()
        load_bundle(out, expect_joints=JOINTS)
        print(f"verify, {label}: {time.monotonic() - t0:.2f} s")


def latency(out: Path, plans: int) -> dict[str, dict[str, float]]:
    from runtime.model.bundle import load_bundle
    from runtime.planner.observation import StateHistory
    from runtime.planner.pipeline import Observation, PlannerPipeline

    t0 = time.monotonic()
    pipe = PlannerPipeline(load_bundle(out, expect_joints=JOINTS), JOINTS, seed=0)
    load_s = time.monotonic() - t0
    print(f"\nbundle verified and engines loaded in {load_s:.1f} s")
    pipe.set_instruction("touch the red block")
    rng = np.random.default_rng(0)
    frames = {f.spec.camera: rng.integers(0, 256, (f.spec.height, f.spec.width, 3),
                                          dtype=np.uint8) for f in pipe.cameras}
    h = StateHistory(len(JOINTS))
    for k in range(20):
        h.add(10**9 + k * 20_000_000, q=rng.normal(0, 0.3, len(JOINTS)),
              dq=np.zeros(len(JOINTS)))
    obs = Observation(frames, h, h.latest_t_ns)
    pipe.plan(obs)  # warm-up
    for _ in range(plans):
        pipe.plan(obs)
    stages = pipe.stage_ms(plans)
    print(f"planner latency per stage ({plans} plans, 1 thread):")
    for name, s in stages.items():
        print(f"  {name:<10} p50 {s['p50']:>9.1f} ms   p99 {s['p99']:>9.1f} ms")
    stages["load"] = {"s": load_s}
    return stages


def live(out: Path, run: Path, total_ms: dict[str, float], duration: int, load_s: float
         ) -> None:
    """`duration` s of planning on the sim, the plan timeout from the measured latency: a plan
    is used until its observation is this old, so it must outlast a plan's latency plus a
    planner period. `duet run --duration` counts from the follower's start, so the planner's
    own start (verify, load: `load_s` here) is added."""
    p99_ms = total_ms["p99"]
    # at least 1 Hz: a cycle that finds no state yet waits a whole period, and a planner
    # slower than its rate plans back to back
    hz = min(5.0, max(1.0, 1e3 / (1.2 * total_ms["p50"])))
    # 2.5 x: the planner alone on the host is faster than beside the sim and the follower
    # (1.5 x dropped every plan as stale on the shared 2-core host); 10 s: the config's most
    timeout_ms = min(10_000.0, 2.5 * p99_ms + 1e3 / hz)
    print(f"\nlive: planner.hz {hz:.2f}, follower.plan_timeout_ms {timeout_ms:.0f} "
          f"(2.5 x p99 {p99_ms:.0f} ms + one period, at most 10 s)", flush=True)
    summary = run / "summary.json"
    total_s = round(duration + 1.5 * load_s + p99_ms / 1e3)
    print(f"duet run --duration {total_s}: {duration} s of planning after the planner's start",
          flush=True)
    cmd = [sys.executable, "-m", "runtime.cli", "run", "--config",
           str(ROOT / "configs/sim.yaml"), "--set", f"bundle.path={out}",
           "--set", f"run_dir={run}", "--set", f"planner.hz={hz:.3f}",
           "--set", f"follower.plan_timeout_ms={timeout_ms:.0f}",
           "--set", "follower.deadline_storm.misses=400",  # a shared host's late ticks
           "--set", "planner.task_source=operator",
           "--set", "planner.instruction=touch the red block",
           "--duration", str(total_s), "--summary-json", str(summary)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                          timeout=total_s + 600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if proc.returncode != 0 or not summary.is_file():
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        raise SystemExit(f"duet run exited {proc.returncode}")
    s = json.loads(summary.read_text())
    p, f = s["planner"], s["follower"]
    said = [line for line in proc.stderr.splitlines() if "planner" in line][-8:]
    print("the planner said:\n  " + "\n  ".join(said))
    received = json.loads((run / "follower-summary.json").read_text())["plans_received"]
    print(f"outcome ok={s['outcome']['ok']} ({s['outcome']['final_mode']}); planner exit "
          f"{s['exit_codes']['planner']}; plans {p['plans']} (received by the follower: "
          f"{received}); ticks tracking a plan "
          f"{f['mode_counts'].get('TRACK', 0)} of {f['ticks']}; planner load "
          f"{p['load_s']} s, first plan {p['first_plan_s']} s; latency p50/p99 "
          f"{p['latency_ms']['p50']}/{p['latency_ms']['p99']} ms")
    for name, st in p.get("stage_ms", {}).items():
        print(f"  live stage {name:<10} p50 {st['p50']:>9.1f} ms   p99 {st['p99']:>9.1f} ms")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs/verify-vla/bundle")
    ap.add_argument("--prefix", default="int8w", help="the prefix's precision (fp16, int8w)")
    ap.add_argument("--small", action="store_true", help="2 decoder layers: check the script")
    ap.add_argument("--plans", type=int, default=5, help="timed plans for the latency")
    ap.add_argument("--duration", type=int, default=30, help="seconds of planning, live")
    ap.add_argument("--reuse", action="store_true", help="keep a bundle already at --out")
    ap.add_argument("--dt", type=float, default=0.5, help="the chunk's step (s): 20 steps "
                    "must outlast a plan's latency")
    args = ap.parse_args()
    out = args.out.resolve()
    if not (args.reuse and (out / "manifest.json").is_file()):
        export(out, args.prefix, args.small, args.dt)
    sizes(out)
    verify(out)
    stages = latency(out, args.plans)
    live(out, out.with_name("run"), stages["total"], args.duration, stages["load"]["s"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
