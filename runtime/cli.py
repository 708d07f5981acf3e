"""The `duet` command. Each feature registers its own subcommands; heavy imports
(mujoco, torch, onnx) happen inside the handlers, so `duet` starts fast on the robot and
works without the optional extras for the commands that do not need them."""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules exposing `register(subparsers)`. Order = order in `duet --help`.
COMMAND_MODULES = [
    "runtime.commands",  # run, follower, planner, estop, reset, task
    "sim.commands",  # sim
    "policy.commands",  # train, eval
    "runtime.deploy.commands",  # install, bundle, config, status, doctor, top, record
    "export.commands",  # export, export check, engines build, bundle create
]


def subcommands(parser: argparse.ArgumentParser | None) -> argparse._SubParsersAction | None:
    """The subcommand action of `parser` (so a later module can add e.g. `bundle create`)."""
    if parser is None:
        return None
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                None)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="duet", description="Onboard dual-system policy runtime")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # feature not present in this install
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
