"""`duet sim`: run the simulated robot (MuJoCo arm behind emulated motors)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("sim", help="run the simulated robot (prints its device first)")
    p.add_argument("--config", required=True, help="robot YAML, e.g. configs/sim.yaml")
    p.add_argument("--site", default=None, help="site YAML layered on top (optional)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key (repeatable)")
    p.add_argument("--run-dir", default=None, help="runtime directory (overrides run_dir)")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError, load_config

    overrides = list(args.overrides)
    if args.run_dir is not None:
        overrides.append(f"run_dir={args.run_dir}")
    try:
        cfg = load_config(args.config, site=args.site, overrides=overrides)
        from sim.server import run_sim

        return run_sim(cfg)
    except ConfigError as exc:
        print(f"duet sim: {exc}", file=sys.stderr)
        return 2
