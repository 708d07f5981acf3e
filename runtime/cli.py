"""The `duet` command. Each feature registers its own subcommands; heavy imports
(mujoco, torch, onnx) happen inside the handlers, so `duet` starts fast on the robot and
works without the optional extras for the commands that do not need them.

Conventions for every subcommand live in runtime/commands/options.py: the shared options, --json,
the exit codes (0 ok, 1 failed check, 2 bad input) and help with an example."""

from __future__ import annotations

import argparse
import importlib
import sys

from runtime.commands.options import Parser
from runtime.version import version

# Modules exposing `register(subparsers)`. Order = order in `duet --help`.
COMMAND_MODULES = [
    "runtime.commands.robot",  # run, follower, planner, estop, reset, task
    "sim.commands",  # sim
    "policy.commands",  # train, eval
    "runtime.commands.deploy",  # install, bundle, config, status, doctor, top, record
    "export.commands",  # export, export check, engines build, bundle create
    "export.dataset.commands",  # dataset export
]

# Examples for subcommands whose module does not give one itself.
EXAMPLES = {
    "export": "duet export --module policy.reference:modules --checkpoint runs/ck "
              "--contract policy/reference_contract.yaml --assets runs/ck --out runs/bundle",
    "export keygen": "duet export keygen --out keys/duet",
    "export check": "duet export check /var/lib/duet/bundles/current",
    "engines": "duet engines build --bundle /var/lib/duet/bundles/current",
    "engines build": "duet engines build --bundle /var/lib/duet/bundles/current",
}


def subcommands(parser: argparse.ArgumentParser | None) -> argparse._SubParsersAction | None:
    """The subcommand action of `parser` (so a later module can add e.g. `bundle create`)."""
    if parser is None:
        return None
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)),
                None)


def _complete_help(parser: argparse.ArgumentParser, path: str = "") -> None:
    """Every subcommand gets a description (its help line) and, from EXAMPLES, an example."""
    action = subcommands(parser)
    if action is not None:
        helps = {c.dest: c.help for c in action._choices_actions}
        for name, sub in action.choices.items():
            full = f"{path} {name}".strip()
            if not sub.description:
                sub.description = helps.get(name)
            if not sub.epilog and full in EXAMPLES:
                sub.epilog = f"example:\n  {EXAMPLES[full]}"
                sub.formatter_class = argparse.RawDescriptionHelpFormatter
            _complete_help(sub, full)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="duet", description="Onboard dual-system policy runtime. "
                    "Exit codes: 0 ok, 1 a check or action failed, 2 bad input.",
                    epilog="example:\n  duet run --config configs/sim.yaml --duration 20\n"
                    "  duet COMMAND --help")
    parser.add_argument("--version", action="version", version=f"duet {version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name and name.startswith(exc.name):
                continue  # feature not present in this install
            raise
        module.register(sub)
    _complete_help(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
