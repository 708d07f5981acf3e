"""The follower core's tick on its own (no bus, no sockets): what `follower.logic_us` is made
of, at 6 joints with the reference bundle's follower model, against the bare ONNX follower
call it contains, measured interleaved in the same run.

    .venv/bin/python -m bench.core_tick [--ticks 20000] [--bundle bundles/reference]

The follower's model also runs on an interruptible engine beside it (RunOptions on every run,
as the follower's engine did before it ran without them): the third row.

A plan arrives every 100 ticks (5 Hz at 500 Hz), prepared between ticks as the follower does.
Run it pinned and real-time for stable figures: `chrt -f 50 taskset -c 1 ...`.
"""

from __future__ import annotations

import argparse
import copy
import gc
import sys
import time
from pathlib import Path

import numpy as np

from runtime.config import load_config
from runtime.follower.core import CoreSettings, FollowerCore
from runtime.model.bundle import load_bundle
from runtime.model.engines import make_engine
from runtime.model.residual import residual_model

ROOT = Path(__file__).resolve().parents[1]
TICK_NS = 2_000_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ticks", type=int, default=20_000)
    ap.add_argument("--bundle", type=Path, default=ROOT / "bundles/reference")
    args = ap.parse_args()
    cfg = load_config(ROOT / "configs/sim.yaml")
    bundle = load_bundle(args.bundle, expect_joints=list(cfg.robot.joints))
    model = residual_model(bundle, list(cfg.robot.joints))
    assert model is not None, "the bundle has no follower model"
    core = FollowerCore(CoreSettings.from_config(cfg), model)
    q, dq = np.array([0.0, 0.02, 1.82, 1.33, 0.0, 0.1]), np.zeros(6)
    core.start(0, q, held=q)
    rng = np.random.default_rng(0)
    plans = [q + np.cumsum(rng.normal(0, 0.01, (10, 6)), axis=0) for _ in range(8)]
    ref, bare_q = np.tile(q, (model.lookahead, 1)), q.copy()
    # the same model on an interruptible engine (RunOptions on every run): what the
    # follower's call cost before it ran without them
    spec = bundle.follower_spec()
    assert spec is not None
    old = copy.copy(model)
    old.engine = make_engine(spec, bundle)
    step_us, bare_us = np.zeros(args.ticks), np.zeros(args.ticks)
    old_us = np.zeros(args.ticks)
    t = TICK_NS
    gc.collect()
    gc.freeze()
    gc.disable()  # as the follower runs
    blocks = sys.getallocatedblocks()
    for i in range(args.ticks):
        if i % 100 == 0:
            core.offer_plan(plans[(i // 100) % 8], 0.1, t - 3_000_000, t - 1_000_000)
        t0 = time.perf_counter_ns()
        core.step(t, q, dq)
        t1 = time.perf_counter_ns()
        model.residual(ref, bare_q, dq)
        t2 = time.perf_counter_ns()
        old.residual(ref, bare_q, dq)
        t3 = time.perf_counter_ns()
        core.slack()
        step_us[i], bare_us[i], old_us[i] = (t1 - t0) / 1e3, (t2 - t1) / 1e3, (t3 - t2) / 1e3
        t += TICK_NS
    grown = sys.getallocatedblocks() - blocks
    gc.enable()
    s, b, o = step_us[1000:], bare_us[1000:], old_us[1000:]
    print(f"follower core tick, 6 joints, {len(s)} ticks ({core.mode.name}), "
          f"{core.plans_accepted} plans")
    print(f"{'':<24} {'p50 us':>8} {'p99 us':>8} {'max us':>9}")
    for name, a in (("core.step (logic)", s), ("bare follower ONNX call", b),
                    ("the same, with RunOptions", o)):
        print(f"{name:<24} {np.median(a):>8.1f} {np.percentile(a, 99):>8.1f} {a.max():>9.1f}")
    print(f"logic beyond the model: p50 {np.median(s) - np.median(b):.1f} us "
          f"({np.median(s) / np.median(b):.2f}x the bare call); "
          f"allocated blocks left after {args.ticks} ticks: {grown}")


if __name__ == "__main__":
    main()
