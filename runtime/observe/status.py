"""`duet status`: one sample of each process's telemetry, one screen (or JSON), then exit.

Exit code: 0 when the follower is healthy by its own configured thresholds (not latched,
loop rate and deadline misses within `follower.health`) and the planner is planning or idle
(no task: the robot holds), 1 otherwise, so scripts can `duet status || alert`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

from runtime.observe.subscriber import TelemetrySubscriber
from runtime.observe.telemetry_view import render, to_jsonable


def collect(run_dir: str, timeout_s: float) -> dict[str, Any]:
    sub = TelemetrySubscriber(run_dir)
    try:
        latest = sub.sample(timeout_s)
    finally:
        sub.close()
    return {source: to_jsonable(latest.get(source)) for source in ("follower", "planner")}


LATCHED = ("FAULT", "ESTOP")


def diagnosis(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """(why the robot is not healthy, the next step) pairs; empty: healthy."""
    follower, planner = sample.get("follower"), sample.get("planner")
    out: list[tuple[str, str]] = []
    if not isinstance(follower, dict):
        out.append(("follower: no telemetry (not running?)",
                    "systemctl status duet-follower; wrong run dir? --run-dir / DUET_RUN_DIR"))
    else:
        health = follower.get("health")
        mode = follower.get("mode")
        listed = health.get("problems") or [] if isinstance(health, dict) else \
            ([] if mode in ("HOLD", "TRACK", "INIT") else [str(mode)])
        for problem in map(str, listed):
            step = ("check the robot, then: duet reset" if problem.startswith(LATCHED)
                    else "duet doctor (CPU contention, governor, real-time)")
            out.append((f"follower: {problem}", step))
    if not isinstance(planner, dict):
        out.append(("planner: no telemetry (not running?)",
                    "systemctl status duet-planner; journalctl -u duet-planner -n 50"))
    elif planner.get("status") not in ("planning", "idle"):
        out.append((f"planner: {planner.get('status')}",
                    "duet doctor (cameras); journalctl -u duet-planner -n 50"))
    return out


def problems(sample: dict[str, Any]) -> list[str]:
    """Why the robot is not healthy (empty: healthy)."""
    return [why for why, _ in diagnosis(sample)]


def healthy(sample: dict[str, Any]) -> bool:
    return not problems(sample)


def run(args: argparse.Namespace, run_dir: str) -> int:
    sample = collect(run_dir, args.timeout)
    found = diagnosis(sample)
    if args.json:
        json.dump({**sample, "healthy": not found, "problems": [
            {"problem": why, "next": step} for why, step in found]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        console = Console()
        console.print(render(sample, title=f"duet status  ({run_dir})"))
        for why, step in found:
            console.print(f"[bold red]{why}[/]\n  next: {step}", highlight=False)
        if not found:
            console.print("[green]healthy[/]")
    return 0 if not found else 1
