"""Follower loop benchmark: the whole stack (sim + planner + follower) at 500 Hz and 1 kHz,
next to a naive `time.sleep(period)` loop measured during the same run, under the same load.

    .venv/bin/python -m bench.follower_loop [--duration 20] [--rates 500 1000]
        [--baseline-tree /path/to/another/checkout] [--load]

Prints one table; figures come from `duet run --summary-json` (DESIGN.md keys). With
`--baseline-tree`, each rate runs first on that checkout (e.g. `git worktree add` of the
previous commit), then on this one: a before/after under the same host state. With `--load`,
each stack runs beside the bench load (bench/load.py: 16 busy processes, a two-thread numpy
job, memory and disk churn and a second sim stack).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.load import Load

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


def run_stack(hz: float, duration_s: float, bundle: str | None,
              tree: Path = REPO) -> tuple[dict, np.ndarray]:
    with tempfile.TemporaryDirectory(prefix="duet-bench-") as tmp:
        summary_path = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "runtime.cli", "run",
               "--config", str(tree / "configs/sim.yaml"),
               "--set", f"run_dir={tmp}", "--set", f"follower.hz={hz}",
               "--duration", str(duration_s), "--summary-json", str(summary_path)]
        if bundle:
            cmd += ["--set", f"bundle.path={bundle}"]
        q: mp.Queue[list[float]] = mp.Queue()
        env = dict(os.environ, PYTHONPATH=str(tree))
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL)
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
    ap.add_argument("--load", action="store_true",
                    help="run each stack beside the bench load (bench/load.py, with a second "
                         "sim stack)")
    ap.add_argument("--baseline-tree", type=Path, default=None,
                    help="another checkout to run first at each rate (before/after)")
    args = ap.parse_args()
    trees = [(f"baseline ({args.baseline_tree.name})", args.baseline_tree.resolve())] \
        if args.baseline_tree else []
    trees.append(("duet follower", REPO))
    loaded = ""
    rows: list[tuple[str, ...]] = []
    columns = ("rate", "loop", "achieved Hz", "jitter p50/p99/p99.9/max µs", "misses",
               "tick compute p50/p99 µs", "logic p50/p99 µs", "bus read/write p50 µs",
               "plan delivery p50/p99 µs", "first track s")
    raw = {}
    for hz in args.rates:
        for label, tree in trees:
            if args.load:
                load = Load(args.duration + 40.0, stack=True)  # + the stack's start and stop
                loaded = f", under load: {load.describe()}"
                with load:
                    s, naive = run_stack(hz, args.duration, args.bundle, tree)
            else:
                s, naive = run_stack(hz, args.duration, args.bundle, tree)
            f = s["follower"]
            j, c, d = f["period_jitter_us"], f["tick_compute_us"], s["plan_delivery_us"]
            logic = f.get("logic_us", {})
            miss_pct = 100.0 * f["deadline_misses"] / max(1, f["ticks"])
            rows.append((f"{hz:g} Hz", label, f"{f['achieved_hz']:.2f}",
                          f"{j['p50']}/{j['p99']}/{j['p999']}/{j['max']}",
                          f"{f['deadline_misses']} ({miss_pct:.3f} %)",
                          f"{c['p50']}/{c['p99']}", f"{logic.get('p50')}/{logic.get('p99')}",
                          f"{f.get('bus_read_us', {}).get('p50')}/"
                          f"{f.get('bus_write_us', {}).get('p50')}",
                          f"{d['p50']}/{d['p99']}", str(s["startup"]["first_track_s"])))
            nj = np.abs(naive - 1e6 / hz)
            rows.append(("", "naive sleep(period)", f"{1e6 / naive.mean():.2f}",
                         "/".join(f"{np.percentile(nj, p):.1f}" for p in (50, 99, 99.9))
                         + f"/{nj.max():.1f}", "-", "-", "-", "-", "-", "-"))
            raw[f"{label} {hz:g}"] = {"summary": s, "naive_achieved_hz": 1e6 / naive.mean(),
                                      "naive_jitter_us_p99": float(np.percentile(nj, 99))}
    table = Table(title=f"follower loop, sim + planner running, {args.duration:g} s per rate"
                        f"{loaded}")
    for col in columns:
        table.add_column(col, justify="right")
    for row in rows:
        table.add_row(*row)
    Console(width=200).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(raw, indent=1))


if __name__ == "__main__":
    main()
