"""The planner pipeline's cost over its bare engine calls, per stage, and latency against K.

    .venv/bin/python -m bench.planner [--bundle DIR ...] [--calls 200]

For each bundle (default: the shipped reference, and a flow-matching planner exported here:
a conv encoder + an MLP velocity network, K = 10): the whole `PlannerPipeline.plan` call
(preprocessing, every stage, the Euler loop, postprocessing) against the same engines called
bare on the same feeds, interleaved in one run. Then the flow planner's latency for K in
1, 2, 4, 8, 16. Medians and p99 in ms; overhead = 1 - bare / pipeline (medians), and paired:
the median of each back-to-back pair's difference / the pipeline's median, and inside: the
median share of each plan spent outside its engine calls (free of the drift of a shared host,
which on a plan of seconds is far larger than what the pipeline adds).

The 0.6 B planner of `make verify-vla` (a plan takes seconds on one CPU thread):

    .venv/bin/python -m bench.planner --bundle runs/verify-vla/bundle --calls 15 \\
        --warmup 1 --no-sweep
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from runtime.model.bundle import Bundle, load_bundle
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PlannerPipeline

ROOT = Path(__file__).resolve().parents[1]
JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper"]


def _observation(pipe: PlannerPipeline) -> Observation:
    rng = np.random.default_rng(0)
    frames = {f.spec.camera: rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)
              for f in pipe.cameras}
    h = StateHistory(6)
    for k in range(20):
        h.add(10**9 + k * 20_000_000, q=rng.normal(0, 0.3, 6), dq=np.zeros(6))
    return Observation(frames, h, h.latest_t_ns)


def _bare(pipe: PlannerPipeline) -> None:
    """The same engine calls the pipeline makes, on the feeds it last filled, nothing else."""
    for run in pipe.stages:
        for _ in range(pipe.flow_steps.get(run.name, 1)):
            run.engine.run(run.feeds)


def measure(bundle: Bundle, calls: int, flow_steps: int | None = None, warmup: int = 10
            ) -> dict[str, float]:
    pipe = PlannerPipeline(bundle, JOINTS, flow_steps=flow_steps, seed=0)
    pipe.set_instruction("touch the red block, then the blue one")
    obs = _observation(pipe)
    for _ in range(warmup):
        pipe.plan(obs)
    full: list[float] = []
    bare: list[float] = []
    for i in range(calls):
        # interleaved, so drift and neighbours hit both alike, and each goes first half the
        # time (the second of two back-to-back engine calls finds warmer caches)
        for which in ((0, 1) if i % 2 else (1, 0)):
            t0 = time.perf_counter()
            pipe.plan(obs) if which == 0 else _bare(pipe)
            (full if which == 0 else bare).append(time.perf_counter() - t0)
    f, b = np.asarray(full) * 1e3, np.asarray(bare) * 1e3
    out = {"pipeline_p50": float(np.median(f)), "pipeline_p99": float(np.percentile(f, 99)),
           "bare_p50": float(np.median(b)), "bare_p99": float(np.percentile(b, 99)),
           "overhead": 1.0 - float(np.median(b)) / float(np.median(f)),
           # each pair ran back to back: their difference cancels the host's drift, which
           # on a plan of seconds is far larger than the pipeline's own cost
           "overhead_paired": float(np.median(f - b)) / float(np.median(f))}
    # inside each plan: its time outside the engine calls (what the pipeline adds), free of
    # any drift between two calls
    plan, engines = pipe.plan_ms.values(calls), pipe.engine_ms.values(calls)
    own = plan - engines
    out |= {"own_p50": float(np.median(own)), "own_p99": float(np.percentile(own, 99)),
            "overhead_inside": float(np.median(own / plan))}
    for name, s in pipe.stage_ms().items():
        if name not in ("total", "engines"):
            out[f"stage {name} p50"] = s["p50"]
    return out


def flow_bundle(root: Path, batch: int = 1, dynamic: bool = False) -> Path:
    """A flow-matching planner of a realistic shape: a conv encoder of the camera and q, and
    an MLP velocity network on (context, x_t, t), integrated K = 10 times; exported with
    `batch` observations per engine call, or up to `batch` when `dynamic` (the same weights
    for every batch)."""
    import contextlib
    import io

    import torch
    import yaml
    from torch import nn

    from export.pipeline import ExportOptions, export_bundle, load_contract

    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Sequential(nn.Conv2d(3, 32, 5, 2), nn.ReLU(), nn.Conv2d(32, 64, 5, 2),
                                      nn.ReLU(), nn.Conv2d(64, 64, 3, 2), nn.ReLU())
            self.fc = nn.Linear(64 + 6, 256)

        def forward(self, image: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
            x = self.conv(image.permute(0, 3, 1, 2).float() / 255.0).mean(dim=(2, 3))
            return torch.tanh(self.fc(torch.cat([x, q], 1)))

    class Velocity(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(256 + 60 + 1, 512), nn.GELU(),
                                     nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 60))

        def forward(self, ctx: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> torch.Tensor:
            z = torch.cat([ctx, x_t.reshape(-1, 60), t.reshape(-1, 1)], 1)
            return self.net(z).reshape(-1, 10, 6)

    contract = {
        "rates": {"planner_hz": 5, "follower_hz": 500},
        "planner": {"stages": [
            {"name": "encoder", "file": "encoder.onnx", "inputs": [
                {"role": "camera", "name": "image", "camera": "scene", "height": 96,
                 "width": 96}, {"role": "proprio", "name": "q"}],
             "outputs": [{"role": "features", "name": "ctx", "shape": [batch, 256]}]},
            {"name": "decoder", "file": "decoder.onnx", "flow": {"steps": 10}, "inputs": [
                {"role": "stage", "name": "ctx", "source": "encoder.ctx"},
                {"role": "noise", "name": "x_t"}, {"role": "flow_time", "name": "t"}],
             "outputs": [{"role": "velocity", "name": "v"}]}],
            "actions": {"horizon": 10, "dt_s": 0.1, "joints": JOINTS,
                        "mean": [0.0] * 6, "std": [0.3] * 6},
            "batch": batch, "dynamic_batch": dynamic}}
    (root / "contract.yaml").write_text(yaml.safe_dump(contract))
    with contextlib.redirect_stdout(io.StringIO()):
        return export_bundle(load_contract(root / "contract.yaml"),
                             {"encoder": Encoder().eval(), "decoder": Velocity().eval()},
                             root / f"flow-b{batch}{'d' if dynamic else ''}",
                             ExportOptions(calib=8, parity_samples=4),
                             root)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, action="append", help="bundle folder (repeatable)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--warmup", type=int, default=10, help="plans before timing")
    ap.add_argument("--no-sweep", action="store_true", help="skip the latency against K")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        flow = flow_bundle(Path(tmp)) if not (args.bundle and args.no_sweep) else None
        paths = args.bundle or [ROOT / "bundles/reference", flow]
        print("planner pipeline vs its bare engine calls (ms; ONNX Runtime CPU, 1 thread; "
              "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg()) + ")")
        print(f"{'bundle':<28} {'pipeline p50/p99':>20} {'bare p50/p99':>20} {'overhead':>9}"
              f" {'paired':>7} {'inside':>7} {'outside engines p50/p99':>24}  stages p50")
        for path in paths:
            r = measure(load_bundle(path), args.calls, warmup=args.warmup)
            stages = ", ".join(f"{k[6:-4]} {v:.3f}" for k, v in r.items()
                               if k.startswith("stage "))
            print(f"{path.name:<28} {r['pipeline_p50']:>10.3f}/{r['pipeline_p99']:<9.3f}"
                  f"{r['bare_p50']:>10.3f}/{r['bare_p99']:<9.3f} {100 * r['overhead']:>8.2f}%"
                  f" {100 * r['overhead_paired']:>6.2f}% {100 * r['overhead_inside']:>6.3f}%"
                  f" {r['own_p50']:>13.3f}/{r['own_p99']:<10.3f}  {stages}", flush=True)
        if args.no_sweep:
            return
        assert flow is not None
        print("\nflow planner latency against K (ms)")
        print(f"{'K':>3} {'pipeline p50':>13} {'p99':>8} {'overhead':>9}")
        bundle = load_bundle(flow)
        for k in (1, 2, 4, 8, 16):
            r = measure(bundle, args.calls, flow_steps=k)
            print(f"{k:>3} {r['pipeline_p50']:>13.3f} {r['pipeline_p99']:>8.3f} "
                  f"{100 * r['overhead']:>8.1f}%")


if __name__ == "__main__":
    main()
