"""The `duet` command. Each feature registers its own subcommands through the `duet.commands`
entry-point group (pyproject.toml); heavy imports (mujoco, torch, onnx) happen inside the
handlers, so `duet` starts fast on the robot and works without the optional extras for the
commands that do not need them.

Conventions for every subcommand live in runtime/commands/options.py: the shared options,
--json, the exit codes (0 ok, 1 failed check, 2 bad input) and help with an example."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from importlib.metadata import EntryPoint, entry_points

from runtime.commands.options import Parser
from runtime.version import version

GROUP = "duet.commands"
# The order of `duet --help`: the robot's own commands first; others after, by name.
ORDER = ("robot", "install", "bundle", "config", "observe", "identify", "sim", "policy",
         "export", "dataset")


def _order(ep: EntryPoint) -> tuple[int, str]:
    return (ORDER.index(ep.name) if ep.name in ORDER else len(ORDER), ep.name)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="duet", description="Onboard dual-system policy runtime. "
                    "Exit codes: 0 ok, 1 a check or action failed, 2 bad input.",
                    epilog="example:\n  duet run --config configs/sim.yaml --duration 20\n"
                    "  duet COMMAND --help")
    parser.add_argument("--version", action="version", version=f"duet {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for ep in sorted(entry_points(group=GROUP), key=_order):
        try:
            register = ep.load()
        except ModuleNotFoundError as exc:
            if exc.name and ep.value.startswith(exc.name):
                continue  # feature not present in this install
            raise
        register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        result = args.func(args)
    except BrokenPipeError:  # `duet record info FILE | head`: the reader had enough
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # nothing more to flush at exit
        return 128 + signal.SIGPIPE
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
