"""`duet sim`: run the simulated robot (MuJoCo arm behind emulated motors)."""

from __future__ import annotations

import argparse

from runtime import cliopts


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = cliopts.subcommand(subparsers, "sim", "run the simulated robot (prints its device "
                           "first)", "duet sim --config configs/sim.yaml --run-dir runs/sim")
    cliopts.add_config(p)
    cliopts.add_run_dir(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = cliopts.load(args, "duet sim")
    from runtime.config import ConfigError
    from sim.server import run_sim

    try:
        return run_sim(cfg)
    except ConfigError as exc:
        return cliopts.fail("duet sim", exc, cliopts.EXIT_USAGE)
