"""The options every `duet` subcommand shares, defined once, and the exit-code convention.

- `--config`: the robot config; default $DUET_CONFIG, else /etc/duet/duet.yaml.
- `--site`: the site layer; default: `site.yaml` beside a config named `duet.yaml` (the
  installed layout), otherwise none, so a workstation never grows files under /etc.
- `--set KEY=VALUE`: one override (repeatable).
- `--run-dir`: the ipc sockets; clients use --run-dir, else $DUET_RUN_DIR, else /run/duet (never
  the YAML, so estop works whatever state it is in); processes put it over the config's run_dir.
- `--json`: one JSON object on stdout instead of the human text.

Exit codes: 0 ok, 1 a check or an action failed, 2 bad input (usage, an invalid config).
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from runtime.config import ConfigError, DuetConfig, load_config
from runtime.ipc import endpoints

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
DEFAULT_CONFIG = "/etc/duet/duet.yaml"
INSTALLED_NAME = "duet.yaml"


class Parser(argparse.ArgumentParser):
    """argparse with "did you mean" for a mistyped subcommand or choice, descriptions from
    the one-line help, and examples kept verbatim in the epilog."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> Any:
        found = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
        if found:
            choices = re.findall(r"'([^']*)'", found.group(2))
            near = difflib.get_close_matches(found.group(1), choices, n=1, cutoff=0.6)
            if near:
                message += f"; did you mean {' or '.join(near)}?"
        return super().error(message)


def subcommand(sub: argparse._SubParsersAction[Any], name: str, help: str, example: str,
               description: str | None = None, **kwargs: Any) -> argparse.ArgumentParser:
    """A subparser with its one-line help, a description and at least one example."""
    return sub.add_parser(name, help=help, description=description or help,
                          epilog="example:\n  " + example.strip().replace("\n", "\n  "),
                          **kwargs)


def config_path(given: str | Path | None) -> Path:
    return Path(given or os.environ.get("DUET_CONFIG") or DEFAULT_CONFIG)


def site_path(given: str | Path | None, config: Path) -> Path | None:
    if given:
        return Path(given)
    return config.with_name("site.yaml") if config.name == INSTALLED_NAME else None


def add_config(p: argparse.ArgumentParser, overrides: bool = True) -> None:
    p.add_argument("--config", default=None,
                   help=f"robot config YAML (default: $DUET_CONFIG, else {DEFAULT_CONFIG})")
    p.add_argument("--site", default=None, help="site overrides YAML layered on it (default: "
                   f"site.yaml beside a config named {INSTALLED_NAME})")
    if overrides:
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override one key (repeatable)")


def add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", default=None, help="runtime dir with the ipc sockets "
                   f"(default: $DUET_RUN_DIR, else {endpoints.DEFAULT_RUN_DIR})")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object")


def files(args: argparse.Namespace) -> tuple[Path, Path | None]:
    config = config_path(getattr(args, "config", None))
    return config, site_path(getattr(args, "site", None), config)


def process_overrides(args: argparse.Namespace) -> list[str]:
    """--set items and the run dir: --run-dir > --set run_dir=... > $DUET_RUN_DIR > the
    config's run_dir."""
    sets = list(getattr(args, "set", []) or [])
    given, env = getattr(args, "run_dir", None), os.environ.get("DUET_RUN_DIR")
    if given:
        sets.append(f"run_dir={os.path.abspath(given)}")
    elif env and not any(item.split("=", 1)[0].strip() == "run_dir" for item in sets):
        sets.insert(0, f"run_dir={os.path.abspath(env)}")
    return sets


def load(args: argparse.Namespace, prog: str = "duet") -> DuetConfig:
    """The config the arguments name; an invalid one exits 2 with its reasons."""
    config, site = files(args)
    try:
        return load_config(config, site, process_overrides(args))
    except ConfigError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE) from None


def run_dir(args: argparse.Namespace) -> str:
    return endpoints.resolve_run_dir(getattr(args, "run_dir", None))


def emit(args: argparse.Namespace, human: str, data: Any) -> None:
    """Human text, or with --json the data as one JSON object."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2, default=str))
    elif human:
        print(human)


def fail(prog: str, message: object, code: int = EXIT_FAILED) -> int:
    print(f"{prog}: {message}", file=sys.stderr)
    return code


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The subcommands of `parser` by name (read-only: the help test and the CLI reference
    walk the tree with it)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def shared(config: bool = True, run_dir: bool = False, store: bool = False,
            overrides: bool = False) -> argparse.ArgumentParser:
    """Options every subcommand of a group takes, accepted after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    if config:
        add_config(p, overrides=overrides)
    if run_dir:
        add_run_dir(p)
    if store:
        from runtime.deploy.layout import Layout

        p.add_argument("--store", type=Path, default=Layout().bundles,
                       help="bundle store folder (default: %(default)s)")
    add_json(p)
    return p
