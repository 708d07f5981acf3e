"""Follower loop benchmark: the whole stack (sim + planner + follower) at 500 Hz and 1 kHz,
next to a naive `time.sleep(period)` loop measured during the same run, under the same load.

    .venv/bin/python bench/follower_loop.py [--duration 20] [--rates 500 1000]

Prints one table; figures come from `duet run --summary-json` (DESIGN.md keys).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]


def naive_loop(period_s: float, duration_s: float, out: mp.Queue[list[float]]) -> None:
    """What a demo script does: sleep(period) after the work, no absolute deadlines."""
    wakes = []
    end = time.monotonic() + duration_s
    while time.monotonic() < end:
        time.sleep(period_s)
        wakes.append(time.monotonic_ns())
    periods = np.diff(np.array(wakes)) / 1000.0
    out.put(periods.tolist())


def run_stack(hz: float, duration_s: float, bundle: str | None) -> tuple[dict, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "runtime.cli", "run",
               "--config", str(REPO / "configs/sim.yaml"),
               "--set", f"run_dir={tmp}", "--set", f"follower.hz={hz}",
               "--duration", str(duration_s), "--summary-json", str(summary_path)]
        if bundle:
            cmd += ["--set", f"bundle.path={bundle}"]
        q: mp.Queue[list[float]] = mp.Queue()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        time.sleep(3.0)  # measure the naive loop while the stack is up
        naive = mp.Process(target=naive_loop, args=(1.0 / hz, duration_s - 5.0, q))
        naive.start()
        periods = np.array(q.get())
        naive.join()
        proc.wait()
        return json.loads(summary_path.read_text()), periods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--duration", type=float, default=20.0)
    ap.add_argument("--rates", type=float, nargs="+", default=[500.0, 1000.0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--json", default=None, help="write the raw figures here")
    args = ap.parse_args()
    table = Table(title=f"follower loop, sim + planner running, {args.duration:g} s per rate")
    for col in ("rate", "loop", "achieved Hz", "jitter p50/p99/p99.9/max µs", "misses",
                "tick compute p50/p99 µs", "plan delivery p50/p99 µs"):
        table.add_column(col, justify="right")
    raw = {}
    for hz in args.rates:
        s, naive = run_stack(hz, args.duration, args.bundle)
        f = s["follower"]
        j, c, d = f["period_jitter_us"], f["tick_compute_us"], s["plan_delivery_us"]
        miss_pct = 100.0 * f["deadline_misses"] / max(1, f["ticks"])
        table.add_row(f"{hz:g} Hz", "duet follower", f"{f['achieved_hz']:.2f}",
                      f"{j['p50']}/{j['p99']}/{j['p999']}/{j['max']}",
                      f"{f['deadline_misses']} ({miss_pct:.3f} %)",
                      f"{c['p50']}/{c['p99']}", f"{d['p50']}/{d['p99']}")
        nj = np.abs(naive - 1e6 / hz)
        table.add_row("", "naive sleep(period)", f"{1e6 / naive.mean():.2f}",
                      "/".join(f"{np.percentile(nj, p):.1f}" for p in (50, 99, 99.9))
                      + f"/{nj.max():.1f}", "-", "-", "-")
        raw[str(hz)] = {"summary": s, "naive_achieved_hz": 1e6 / naive.mean(),
                        "naive_jitter_us_p99": float(np.percentile(nj, 99))}
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
