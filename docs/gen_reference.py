"""The generated reference pages: configuration (from the pydantic schema, runtime/config/)
and CLI (from `runtime.cli.build_parser()`).

A MkDocs hook (`hooks:` in mkdocs.yml): `on_files` adds `reference/config.md` and
`reference/cli.md` to the build, generated from the code at every build, so they are never
stale and never committed. As a script it writes them to a folder, to read without MkDocs:

    python docs/gen_reference.py OUTDIR
"""

from __future__ import annotations

import argparse
import inspect
import io
import re
import sys
import tokenize
import types
import typing
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # this checkout's runtime, not an installed one

from pydantic import BaseModel  # noqa: E402
from pydantic.fields import FieldInfo  # noqa: E402
from pydantic_core import PydanticUndefined  # noqa: E402

CONFIG_PAGE = "reference/config.md"
CLI_PAGE = "reference/cli.md"


# --- configuration ------------------------------------------------------------------------

def _comments(cls: type) -> dict[str, str]:
    """The comments beside each field of `cls` in its source: the block just above the field
    and the one at the end of its line(s). The schema documents itself this way."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    lines = source.splitlines()
    trailing: dict[int, str] = {}
    own_line: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row, col = tok.start
            text = tok.string.lstrip("#").strip()
            if lines[row - 1][:col].strip():
                trailing[row] = text
            else:
                own_line[row] = text
    out: dict[str, str] = {}
    field_re = re.compile(r"^    (\w+)\s*:")
    for i, line in enumerate(lines, start=1):
        m = field_re.match(line)
        if not m:
            continue
        above: list[str] = []
        j = i - 1
        while j in own_line:
            above.insert(0, own_line[j])
            j -= 1
        # a field may span lines: its trailing comment is on one of them
        end = i
        depth = line.count("(") + line.count("[") - line.count(")") - line.count("]")
        while depth > 0 and end < len(lines):
            end += 1
            nxt = lines[end - 1]
            depth += nxt.count("(") + nxt.count("[") - nxt.count(")") - nxt.count("]")
        after = [trailing[r] for r in range(i, end + 1) if r in trailing]
        text = " ".join(above + after).strip()
        if text:
            out[m.group(1)] = text
    return out


def _type_name(annotation: Any) -> str:
    """A short readable type: `float`, `list[int] | None`, `'hold' | 'torque_off'`."""
    if annotation is type(None):
        return "None"
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]"
    if isinstance(annotation, type):
        if issubclass(annotation, BaseModel):
            return annotation.__name__
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _models(annotation: Any) -> list[type[BaseModel]]:
    """Every model a field can hold, through unions, Annotated, lists and dict values."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    out: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        for m in _models(arg):
            if m not in out:
                out.append(m)
    return out


def _container(annotation: Any) -> str:
    """The key-path suffix a field's container adds: `[]` for a list, `.<name>` for a dict."""
    for candidate in [annotation, *typing.get_args(annotation)]:
        origin = typing.get_origin(candidate)
        if origin is typing.Annotated:
            return _container(typing.get_args(candidate)[0])
        if origin is list:
            return "[]"
        if origin is dict:
            return ".<name>"
    return ""


def _default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        value: Any = field.default_factory()  # type: ignore[call-arg]
    elif field.default is PydanticUndefined:
        return "**required**"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(its defaults)"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: …" for k in value) + "}" if value else "{}"
    if value is None:
        return "none"
    return repr(value) if isinstance(value, str) else str(value).replace("True", "true") \
        .replace("False", "false")


_BOUNDS = {"gt": ">", "ge": "≥", "lt": "<", "le": "≤"}


def _constraints(field: FieldInfo) -> str:
    parts: list[str] = []
    for meta in field.metadata:
        for attr, sign in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else
                             f"{sign} {value}")
        for attr, label in (("min_length", "min length"), ("max_length", "max length"),
                            ("pattern", "matches")):
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{label} `{value}`" if attr == "pattern" else f"{label} {value}")
    if getattr(field, "allow_inf_nan", None) is False:
        parts.append("finite")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _section(model: type[BaseModel], path: str, out: list[str], tunables: frozenset[str],
             seen: set[tuple[str, type]]) -> None:
    if (path, model) in seen:
        return
    seen.add((path, model))
    comments = _comments(model)
    title = f"`{path}`" if path else "top level"
    kind = model.model_fields.get("kind")
    if kind is not None and isinstance(kind.default, str) and path:
        title += f" (kind: `{kind.default}`)"
    out += [f"## {title}", ""]
    doc = inspect.getdoc(model)
    if doc and model.__doc__ is not None and "__doc__" in model.__dict__:
        out += [" ".join(doc.split()), ""]
    out += [f"Model: `runtime.config.{model.__name__}`.", "",
            "| key | type | default | bounds | description |", "|---|---|---|---|---|"]
    nested: list[tuple[type[BaseModel], str]] = []
    for name, field in model.model_fields.items():
        key = f"{path}.{name}" if path else name
        desc = field.description or comments.get(name, "")
        if key in tunables:
            desc = (desc + " " if desc else "") + "**Live tunable** (`duet config set`)."
        out.append(f"| `{key}` | {_cell(_type_name(field.annotation))} | "
                   f"{_cell(_default(field))} | {_cell(_constraints(field))} | {_cell(desc)} |")
        for sub in _models(field.annotation):
            nested.append((sub, key + _container(field.annotation)))
    out.append("")
    for sub, sub_path in nested:
        _section(sub, sub_path, out, tunables, seen)


def config_reference() -> str:
    from runtime.config import TUNABLES, DuetConfig

    out = [
        "# Configuration reference",
        "",
        "<!-- generated by docs/gen_reference.py from runtime/config/schema.py at every build -->",
        "",
        "Every key of the robot config, from the schema `duet` validates it with "
        "(`runtime.config.DuetConfig`, pydantic). Layers: `configs/<robot>.yaml` < site file "
        "< `--set key=value`; see [Configuration](../configuration.md). A key path with `[]` "
        "is a list entry, `<name>` a mapping key of your choosing. No key outside this "
        "schema is accepted (a mistyped one gets a \"did you mean\"), and no number that can "
        "reach the motor path may be infinite or NaN.",
        "",
    ]
    _section(DuetConfig, "", out, TUNABLES, set())
    return "\n".join(out).rstrip() + "\n"


# --- CLI ----------------------------------------------------------------------------------

def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, argparse.ArgumentParser]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices.items())
    return []


def _usage(parser: argparse.ArgumentParser) -> str:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=88)
    formatter.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups)
    return formatter.format_help().strip()


def _option_rows(parser: argparse.ArgumentParser) -> list[str]:
    formatter = argparse.HelpFormatter(prog=parser.prog, width=88)
    rows: list[str] = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        if action.option_strings:
            names = ", ".join(action.option_strings)
            if action.nargs != 0:
                names += " " + formatter._format_args(action, action.dest.upper())
        else:
            names = formatter._format_args(action, action.dest)
        helptext = formatter._expand_help(action) if action.help else ""
        if action.choices is not None and not isinstance(action.choices, dict):
            helptext += f" (one of: {', '.join(str(c) for c in action.choices)})"
        rows.append(f"| `{_cell(names)}` | {_cell(helptext.strip())} |")
    return rows


def _command(name: str, parser: argparse.ArgumentParser, level: int, out: list[str]) -> None:
    out += [f"{'#' * level} `{name}`", ""]
    if parser.description:
        out += [" ".join(parser.description.split()), ""]
    out += ["```text", _usage(parser), "```", ""]
    rows = _option_rows(parser)
    if rows:
        out += ["| argument | what |", "|---|---|", *rows, ""]
    epilog = (parser.epilog or "").strip()
    if epilog:
        body = re.sub(r"^examples?:\s*\n", "", epilog)
        out += ["Example:" if epilog.startswith("example") else "", "", "```bash",
                *[line.strip() for line in body.splitlines()], "```", ""]
    for sub_name, sub in _subparsers(parser):
        _command(f"{name} {sub_name}", sub, min(level + 1, 4), out)


def cli_reference() -> str:
    from runtime.cli import build_parser

    parser = build_parser()
    out = [
        "# CLI reference",
        "",
        "<!-- generated by docs/gen_reference.py from runtime.cli.build_parser() at every "
        "build -->",
        "",
        " ".join((parser.description or "").split()),
        "",
        "Every command takes `--help` (a description and an example). The client commands "
        "take `--run-dir` (default `$DUET_RUN_DIR`, else `/run/duet`), the config commands "
        "`--config` / `--site` (default `$DUET_CONFIG`, else `/etc/duet/duet.yaml` and the "
        "`site.yaml` beside it). Commands whose extra is not installed (e.g. `train` without "
        "torch) are left out of `duet --help`; this page lists what this checkout offers.",
        "",
        "```text",
        _usage(parser),
        "```",
        "",
        "| command | what |",
        "|---|---|",
    ]
    subs = _subparsers(parser)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for choice in action._choices_actions:
                out.append(f"| [`{choice.dest}`](#duet-{choice.dest}) | "
                           f"{_cell(' '.join((choice.help or '').split()))} |")
    out.append("")
    for name, sub in subs:
        _command(f"duet {name}", sub, 2, out)
    return "\n".join(out).rstrip() + "\n"


PAGES = {CONFIG_PAGE: config_reference, CLI_PAGE: cli_reference}


# --- the MkDocs hook ----------------------------------------------------------------------

def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for uri, make in PAGES.items():
        existing = files.get_file_from_path(uri)
        if existing is not None:
            files.remove(existing)
        files.append(File.generated(config, uri, content=make()))
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="write the generated reference pages")
    ap.add_argument("out", type=Path, help="folder to write reference/config.md, cli.md into")
    args = ap.parse_args(argv)
    for uri, make in PAGES.items():
        path = args.out / uri
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(make(), encoding="utf-8")
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
