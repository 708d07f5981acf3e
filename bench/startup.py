"""Startup benchmark: where the time from `duet run` to the first tracked command goes.

    .venv/bin/python -m bench.startup [--runs 3] [--baseline-tree DIR] [--load]

Starts `duet run --config configs/sim.yaml` for a few seconds, `--runs` times (alternated with
`--baseline-tree`, another checkout, when given: a before/after under the same host state),
and times each milestone by when its log line arrives on stderr, from the moment `duet run`
was executed: the sim's device, the follower's READY (its bus open and engine loaded), the
planner's first plan and the follower's first TRACK. Prints median and max per milestone
with the summary's own "start → first tracked command" (from the supervisor's start, after
its imports). With `--load`, each run is beside the bench load (bench/load.py, with a
second sim stack).
"""

from __future__ import annotations

import argparse
import json
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

# milestone -> the start of the log line that marks it (the first one seen)
MILESTONES = {
    "sim device": "sim robot on",
    "follower ready": "follower ready",
    "planner planning": "planner status: planning",
    "first TRACK": "TRACK (was",
}


def run_once(tree: Path, duration_s: float) -> dict[str, float | None]:
    """Seconds from exec to each milestone, and the summary's first_track_s."""
    with tempfile.TemporaryDirectory(prefix="duet-startup-") as tmp:
        summary = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "runtime.cli", "run", "--config",
               str(tree / "configs/sim.yaml"), "--set", f"run_dir={tmp}",
               "--duration", str(duration_s), "--summary-json", str(summary)]
        env = dict(os.environ, PYTHONPATH=str(tree), PYTHONUNBUFFERED="1")
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        seen: dict[str, float | None] = dict.fromkeys(MILESTONES)
        assert proc.stderr is not None
        for line in proc.stderr:
            now = time.monotonic() - t0
            msg = line.partition('msg="')[2]
            for name, start in MILESTONES.items():
                if seen[name] is None and msg.startswith(start):
                    seen[name] = now
        proc.wait()
        s = json.loads(summary.read_text()) if summary.exists() else {}
        seen["summary first_track_s"] = (s.get("startup") or {}).get("first_track_s")
        planner = s.get("planner") or {}
        seen["planner: engines loaded (own clock)"] = planner.get("load_s")
        seen["planner: first plan (own clock)"] = planner.get("first_plan_s")
        return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--duration", type=float, default=4.0, help="seconds after READY")
    ap.add_argument("--baseline-tree", type=Path, default=None)
    ap.add_argument("--load", action="store_true")
    ap.add_argument("--json", default=None, help="write the raw figures here")
    args = ap.parse_args()
    trees = [("baseline", args.baseline_tree.resolve())] if args.baseline_tree else []
    trees.append(("this tree", REPO))
    runs: dict[str, list[dict[str, float | None]]] = {label: [] for label, _ in trees}
    load = Load(args.runs * len(trees) * (args.duration + 40.0), stack=True) \
        if args.load else None
    if load is not None:
        load.__enter__()
    try:
        for _ in range(args.runs):
            for label, tree in trees:
                runs[label].append(run_once(tree, args.duration))
    finally:
        if load is not None:
            load.__exit__(None, None, None)
    keys = [*MILESTONES, "summary first_track_s", "planner: engines loaded (own clock)",
            "planner: first plan (own clock)"]
    title = f"start → milestones, s from exec (median / max of {args.runs})" \
        + (f", under load: {load.describe()}" if load is not None else "")
    table = Table(title=title)
    table.add_column("milestone")
    for label, _ in trees:
        table.add_column(label, justify="right")
    for key in keys:
        cells = []
        for label, _ in trees:
            vals = [v for r in runs[label] if (v := r[key]) is not None]
            missing = len(runs[label]) - len(vals)
            cell = f"{np.median(vals):.2f} / {max(vals):.2f}" if vals else "-"
            cells.append(cell + (f" ({missing} never)" if missing else ""))
        table.add_row(key, *cells)
    Console(width=160).print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
