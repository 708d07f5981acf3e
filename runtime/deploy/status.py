"""`duet status`: one sample of each process's telemetry, one screen (or JSON), then exit.

Exit code: 0 when the follower is healthy by its own configured thresholds (not latched,
loop rate and deadline misses within `follower.health`) and the planner is planning or idle
(no task: the robot holds), 1 otherwise, so scripts can `duet status || alert`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from runtime.deploy.ipc import TelemetrySubscriber
from runtime.deploy.layout import Layout
from runtime.deploy.telemetry_view import render, to_jsonable

ETC = Layout()


def collect(run_dir: str, timeout_s: float) -> dict[str, Any]:
    sub = TelemetrySubscriber(run_dir)
    try:
        latest = sub.sample(timeout_s)
    finally:
        sub.close()
    return {source: to_jsonable(latest.get(source)) for source in ("follower", "planner")}


def problems(sample: dict[str, Any]) -> list[str]:
    """Why the robot is not healthy (empty: healthy)."""
    follower, planner = sample.get("follower"), sample.get("planner")
    out: list[str] = []
    if not isinstance(follower, dict):
        out.append("follower: no telemetry (not running?)")
    else:
        health = follower.get("health")
        if isinstance(health, dict):
            out += [f"follower: {p}" for p in health.get("problems") or []]
        elif follower.get("mode") not in ("HOLD", "TRACK"):
            out.append(f"follower: {follower.get('mode')}")
    if not isinstance(planner, dict):
        out.append("planner: no telemetry (not running?)")
    elif planner.get("status") not in ("planning", "idle"):
        out.append(f"planner: {planner.get('status')}")
    return out


def healthy(sample: dict[str, Any]) -> bool:
    return not problems(sample)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run-dir", help="runtime dir with the ipc sockets (default: config)")
    parser.add_argument("--config", type=Path, default=ETC.config, help="robot config (run_dir)")
    parser.add_argument("--site", type=Path, default=ETC.site, help="site config on --config")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--timeout", type=float, default=1.5, help="seconds to wait for a sample")


def run(args: argparse.Namespace, run_dir: str) -> int:
    sample = collect(run_dir, args.timeout)
    if args.json:
        json.dump(sample, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        Console().print(render(sample, title=f"duet status  ({run_dir})"))
    return 0 if healthy(sample) else 1
