"""`duet run | follower | planner | estop | reset`."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from runtime.config import ConfigError, DuetConfig, load_config
from runtime.logs import setup_logging

DEFAULT_SITE = "/etc/duet/site.yaml"


def add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="/etc/duet/duet.yaml", help="robot config YAML")
    p.add_argument("--site", default=DEFAULT_SITE, help="site overrides YAML (if present)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override one key (repeatable)")


def load_from_args(args: argparse.Namespace) -> DuetConfig:
    try:
        return load_config(args.config, args.site, args.set)
    except ConfigError as exc:
        print(f"duet: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _positive_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


def _run(args: argparse.Namespace) -> int:
    from runtime.supervisor import run

    setup_logging()
    cfg = load_from_args(args)
    return run(cfg, args.config, args.duration, args.summary_json, args.ready_timeout)


def _follower(args: argparse.Namespace) -> int:
    from runtime.follower import run_follower

    setup_logging()
    return run_follower(load_from_args(args), args.duration)


def _planner(args: argparse.Namespace) -> int:
    from runtime.planner import run_planner

    setup_logging()
    return run_planner(load_from_args(args), args.duration)


def _print(args: argparse.Namespace, human: str, data: dict[str, Any]) -> None:
    print(json.dumps(data) if getattr(args, "json", False) else human)


def _estop(args: argparse.Namespace) -> int:
    """The control socket first; if it does not answer, SIGUSR1 to the pid holding the run
    dir's follower lock; only when both fail: NOT STOPPED and a non-zero exit."""
    import os
    import signal
    import time
    from pathlib import Path

    from runtime import endpoints, rundir
    from runtime.rpc import ControlError, request_at

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    who = os.environ.get("SUDO_USER") or os.environ.get("USER") or str(os.getuid())
    try:
        reply = request_at(endpoints.control(run_dir), "estop", {"reason": f"cli ({who})"},
                           timeout_s=1.0)
        if reply["ok"]:
            _print(args, "ESTOP: torque off. Resume with: duet reset",
                   {"stopped": True, "via": "control", **reply["result"]})
            return 0
        why = str(reply["error"])
    except ControlError as exc:
        why = str(exc)
    held, pid = rundir.holder(run_dir, endpoints.FOLLOWER_LOCK)
    if held and pid:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError as exc:
            why += f"; SIGUSR1 to pid {pid} failed: {exc.strerror}"
        else:
            latch = Path(run_dir, endpoints.LATCH)
            for _ in range(20):
                time.sleep(0.05)
                try:
                    if latch.read_text().startswith("ESTOP"):
                        _print(args, f"ESTOP by signal to the follower (pid {pid}): torque off."
                               f" The control socket did not answer ({why}). "
                               "Resume with: duet reset",
                               {"stopped": True, "via": "signal", "pid": pid})
                        return 0
                except OSError:
                    pass
            why += f"; SIGUSR1 sent to pid {pid} but the follower did not confirm"
    else:
        why += f"; no follower holds {run_dir}/{endpoints.FOLLOWER_LOCK}"
    print(f"NOT STOPPED: {why}. Use the hardware e-stop.", file=sys.stderr)
    return 1


def _reset(args: argparse.Namespace) -> int:
    from runtime import endpoints
    from runtime.rpc import ControlError, request_at

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    try:  # a reset may reopen the bus and re-enable torque: allow it time
        reply = request_at(endpoints.control(run_dir), "reset", {}, timeout_s=10.0)
    except ControlError as exc:
        print(f"duet reset: {exc}", file=sys.stderr)
        return 1
    if not reply["ok"]:
        print(f"duet reset: {reply['error']}", file=sys.stderr)
        return 1
    result = reply["result"]
    _print(args, f"{result.get('mode')}: {result.get('detail')}", result)
    return 0


def _task(args: argparse.Namespace) -> int:
    from runtime import endpoints
    from runtime.rpc import ControlError, request_at

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    if args.clear:
        body: dict[str, Any] = {"clear": True}
    elif args.instruction:
        body = {"instruction": args.instruction}
        if args.episode is not None:
            body["episode"] = int(args.episode) if args.episode.isdigit() else args.episode
    else:
        body = {}
    try:
        reply = request_at(endpoints.task(run_dir), "task" if body else "status", body)
    except ControlError as exc:
        print(f"duet task: {exc}", file=sys.stderr)
        return 1
    if not reply["ok"]:
        print(f"duet task: {reply['error']}", file=sys.stderr)
        return 2 if "refused" in str(reply["error"]) else 1
    result = reply["result"]
    if not body:
        text = result.get("instruction") or "(no task: idle)"
        _print(args, f"task: {text}  [planner {result.get('status')}]", result)
    elif args.clear:
        _print(args, "task cleared: the planner stops, the follower holds", result)
    else:
        _print(args, f"task set: {result['task']['instruction']}", result)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run sim (if configured), follower and planner; summarise")
    add_config_args(p)
    p.add_argument("--duration", type=float, default=None, help="seconds, default: until Ctrl-C")
    p.add_argument("--summary-json", default=None, help="write the summary JSON here")
    p.add_argument("--ready-timeout", type=_positive_s, default=None, metavar="S",
                   help="seconds for the sim to offer its device and the follower to be ready"
                        " (default 30; raise it on slow or emulated machines)")
    p.set_defaults(func=_run)

    for name, func, text in (("follower", _follower, "the real-time follower process"),
                             ("planner", _planner, "the planner process")):
        p = sub.add_parser(name, help=text)
        add_config_args(p)
        p.add_argument("--duration", type=float, default=None)
        p.set_defaults(func=func)

    run_dir_help = "runtime directory (default: $DUET_RUN_DIR, else /run/duet)"
    for cmd, func, text in (
            ("estop", _estop, "emergency stop: torque off until `duet reset`"),
            ("reset", _reset, "leave FAULT/ESTOP: re-read the motors, hold what they hold")):
        p = sub.add_parser(cmd, help=text, description=text)
        p.add_argument("--run-dir", default=None, help=run_dir_help)
        p.add_argument("--json", action="store_true", help="print one JSON object")
        p.set_defaults(func=func)

    p = sub.add_parser("task", help="set, show or clear the planner's instruction",
                       description="Set the instruction the planner works on, live. "
                       "Example: duet task \"touch the red block\" --episode 17")
    p.add_argument("instruction", nargs="?", help="the instruction (omit to show the task)")
    p.add_argument("--episode", default=None, help="an episode id to label the task with")
    p.add_argument("--clear", action="store_true", help="no task: stop planning, hold")
    p.add_argument("--run-dir", default=None, help=run_dir_help)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_task)
