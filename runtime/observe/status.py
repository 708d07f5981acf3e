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
from rich.markup import escape

from runtime.ipc.follower_mode import LATCHED_MODES
from runtime.observe.reasons import summarize
from runtime.observe.rollout import shadow_report, watch_record
from runtime.observe.subscriber import TelemetrySubscriber
from runtime.observe.telemetry_view import render, to_jsonable


def collect(run_dir: str, timeout_s: float) -> dict[str, Any]:
    sub = TelemetrySubscriber(run_dir)
    try:
        latest = sub.sample(timeout_s)
    finally:
        sub.close()
    return {**{source: to_jsonable(latest.get(source)) for source in ("follower", "planner")},
            "shadow": shadow_report(run_dir), "watch": watch_record(run_dir)}


ROBOT, WORKSTATION = "robot", "workstation"
_FOLLOWER_UNIT = Path("/etc/systemd/system/duet-follower.service")

# The next step for each cause, by setting: on a robot systemd runs the processes (units
# installed, the system run dir); on a workstation `duet run` does, and there is no unit to
# ask about. A step that says "duet doctor" is left out when doctor itself is reporting.
NEXT_STEP: dict[str, dict[str, str]] = {
    # an operator may reset out of ESTOP; out of FAULT it takes an admin (sudo on a robot:
    # runtime/ipc/follower_mode.py reset_command)
    "estop": {ROBOT: "check the robot (the reason above), then: duet reset",
              WORKSTATION: "check the robot (the reason above), then: duet reset"},
    "latched": {ROBOT: "check the robot (the reason above), then: sudo duet reset",
                WORKSTATION: "check the robot (the reason above), then: duet reset"},
    "latched_timing": {  # a deadline storm: the CPU's doing, not the robot's
        ROBOT: "find what took the CPU: duet doctor (CPU contention, governor, real-time); "
               "then: sudo duet reset",
        WORKSTATION: "the host was too busy for the loop (raise follower.deadline_storm.misses "
                     "on a shared machine); then: duet reset"},
    "timing": {ROBOT: "duet doctor (CPU contention, governor, real-time)",
               WORKSTATION: "the host is too busy for the loop: close what competes for the "
                            "CPU, or pin the follower (follower.realtime.cpu)"},
    "follower_silent": {
        ROBOT: "systemctl status duet-follower; wrong run dir? --run-dir / DUET_RUN_DIR",
        WORKSTATION: "is `duet run` running on this run dir? --run-dir / DUET_RUN_DIR"},
    "planner_silent": {ROBOT: "systemctl status duet-planner; journalctl -u duet-planner -n 50",
                       WORKSTATION: "the planner's lines in the `duet run` shell"},
    "planner_no_state": {  # the follower publishes the joint state: it is the one to look at
        ROBOT: "no joint state from the follower: systemctl status duet-follower",
        WORKSTATION: "no joint state from the follower: the follower's lines in the "
                     "`duet run` shell"},
    "planner_no_frames": {ROBOT: "duet doctor (cameras); journalctl -u duet-planner -n 50",
                          WORKSTATION: "duet doctor (cameras); the planner's lines in the "
                                       "`duet run` shell"},
    "planner_other": {ROBOT: "journalctl -u duet-planner -n 50",
                      WORKSTATION: "the planner's lines in the `duet run` shell"},
}


def setting(run_dir: str) -> str:
    """ROBOT when systemd's duet runs on this run dir, else WORKSTATION."""
    from runtime.ipc.endpoints import DEFAULT_RUN_DIR

    installed = _FOLLOWER_UNIT.is_file()
    return ROBOT if installed and Path(run_dir) == Path(DEFAULT_RUN_DIR) else WORKSTATION


def _follower_cause(problem: str) -> str:
    if problem.startswith("ESTOP"):
        return "estop"
    if problem.startswith(LATCHED_MODES):
        return "latched_timing" if "deadline-miss storm" in problem else "latched"
    return "timing"  # loop rate or missed deadlines


def _planner_cause(status: Any) -> str:
    return {"no_state": "planner_no_state", "no_frames": "planner_no_frames"}.get(
        str(status).split(" ", 1)[0], "planner_other")


def diagnosis(sample: dict[str, Any], where: str = WORKSTATION, in_doctor: bool = False
              ) -> list[tuple[str, str]]:
    """(why the robot is not healthy, the next step for that cause in this setting) pairs;
    empty: healthy."""
    follower, planner = sample.get("follower"), sample.get("planner")
    found: list[tuple[str, str]] = []
    if not isinstance(follower, dict):
        found.append(("follower: no telemetry (not running?)", "follower_silent"))
    else:
        health = follower.get("health")
        mode = follower.get("mode")
        listed = health.get("problems") or [] if isinstance(health, dict) else \
            ([] if mode in ("HOLD", "TRACK", "INIT") else [str(mode)])
        found += [(f"follower: {p}", _follower_cause(p)) for p in map(str, listed)]
    if not isinstance(planner, dict):
        found.append(("planner: no telemetry (not running?)", "planner_silent"))
    elif planner.get("status") not in ("planning", "idle"):
        found.append((f"planner: {planner.get('status')}", _planner_cause(planner.get("status"))))
    out = []
    for why, cause in found:
        step = NEXT_STEP[cause][where]
        if in_doctor:  # doctor is already running: keep only the rest of the advice
            step = "; ".join(part for part in step.split("; ") if "duet doctor" not in part) \
                or "see the checks above"
        out.append((why, step))
    return out


def problems(sample: dict[str, Any]) -> list[str]:
    """Why the robot is not healthy (empty: healthy)."""
    return [why for why, _ in diagnosis(sample)]


def healthy(sample: dict[str, Any]) -> bool:
    return not problems(sample)


def run(args: argparse.Namespace, run_dir: str) -> int:
    sample = collect(run_dir, args.timeout)
    found = diagnosis(sample, setting(run_dir))
    if args.json:
        json.dump({**sample, "healthy": not found, "problems": [
            {"problem": why, "next": step} for why, step in found]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        console = Console()
        console.print(render(sample, title=f"duet status  ({run_dir})"))
        for why, step in found:  # the JSON above keeps each reason in full
            console.print(f"[bold red]{escape(summarize(why))}[/]\n  next: {escape(step)}",
                          highlight=False)
        if not found:
            console.print("[green]healthy[/]")
    return 0 if not found else 1
