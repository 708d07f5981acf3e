"""`duet status`: one sample of each process's telemetry, one screen (or JSON), then exit.

Exit code: 0 when the follower reports HOLD or TRACK and the planner is planning,
1 when anything is missing or in FAULT/ESTOP, so scripts can `duet status || alert`.
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


def healthy(sample: dict[str, Any]) -> bool:
    follower, planner = sample.get("follower"), sample.get("planner")
    return (
        isinstance(follower, dict) and follower.get("mode") in ("HOLD", "TRACK")
        and isinstance(planner, dict) and planner.get("status") == "planning"
    )


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
