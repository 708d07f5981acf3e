"""`duet run | follower | planner | estop | reset`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

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


def _run(args: argparse.Namespace) -> int:
    from runtime.supervisor import run

    setup_logging()
    cfg = load_from_args(args)
    return run(cfg, args.config, args.duration, args.summary_json)


def _follower(args: argparse.Namespace) -> int:
    from runtime.follower import run_follower

    setup_logging()
    return run_follower(load_from_args(args), args.duration)


def _planner(args: argparse.Namespace) -> int:
    from runtime.planner import run_planner

    setup_logging()
    return run_planner(load_from_args(args), args.duration)


def _control(cmd: str) -> Callable[[argparse.Namespace], int]:
    def handler(args: argparse.Namespace) -> int:
        from runtime.control_client import ControlError, request

        run_dir = args.run_dir or load_from_args(args).run_dir
        try:
            reply = request(run_dir, cmd, {"reason": "cli"} if cmd == "estop" else {})
        except ControlError as exc:
            print(f"duet {cmd}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(reply["result"]) if reply["ok"] else f"duet {cmd}: {reply['error']}")
        return 0 if reply["ok"] else 1

    return handler


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run sim (if configured), follower and planner; summarise")
    add_config_args(p)
    p.add_argument("--duration", type=float, default=None, help="seconds, default: until Ctrl-C")
    p.add_argument("--summary-json", default=None, help="write the summary JSON here")
    p.set_defaults(func=_run)

    for name, func, text in (("follower", _follower, "the real-time follower process"),
                             ("planner", _planner, "the planner process")):
        p = sub.add_parser(name, help=text)
        add_config_args(p)
        p.add_argument("--duration", type=float, default=None)
        p.set_defaults(func=func)

    for cmd, text in (("estop", "emergency stop: torque off until reset"),
                      ("reset", "leave FAULT/ESTOP: re-read the motors and hold")):
        p = sub.add_parser(cmd, help=text)
        add_config_args(p)
        p.add_argument("--run-dir", default=None, help="runtime directory (default: config)")
        p.set_defaults(func=_control(cmd))
