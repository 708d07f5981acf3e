"""Config over SSH: validate, show, set (locked, atomic, backed up, logged, applied live), diff.

Operator changes go into the site file (/etc/duet/site.yaml), layered on the shipped robot
config (/etc/duet/duet.yaml), so `duet config diff` always shows what the site changed.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from runtime.config import (
    TUNABLES,
    ConfigError,
    DuetConfig,
    close_keys,
    config_to_dict,
    file_layer,
    load_config,
    parse_override,
    set_path,
    validate_layers,
)
from runtime.deploy.install import DERIVED_KEY_PREFIXES
from runtime.deploy.units import WORKSTATION_RESTART, restart_command
from runtime.ipc.access import caller


def effective(config: Path, site: Path | None, overrides: list[str] | None = None
              ) -> DuetConfig:
    return load_config(config, site if site is not None and site.exists() else None, overrides)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(data, dict):
        return {prefix: data}
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, path))
        else:
            out[path] = value
    return out


def diff(config: Path, site: Path | None) -> list[tuple[str, Any, Any]]:
    """(key, shipped, effective) for every key the site layer changes."""
    shipped = flatten(config_to_dict(load_config(config)))
    eff = flatten(config_to_dict(effective(config, site)))
    keys = sorted(set(shipped) | set(eff))
    return [(k, shipped.get(k), eff.get(k)) for k in keys if shipped.get(k) != eff.get(k)]


def lookup(cfg: DuetConfig, key: str) -> Any:
    node: Any = config_to_dict(cfg)
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            near = close_keys(key)
            hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            raise ConfigError(f"{key}: no such key{hint}")
        node = node[part]
    return node


@contextlib.contextmanager
def locked(site: Path) -> Iterator[None]:
    """Hold an exclusive flock on the site file's folder for a read-modify-write, so two
    `duet config set` never lose one of their updates. Locking the folder, not the file:
    the file is replaced by rename, and a folder needs no lock file left behind."""
    folder = site.parent
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def log_change(log: Path, key: str, old: Any, new: Any, applied: str) -> str:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = (f"{stamp} user={caller()} key={key} old={_flow(old)} new={_flow(new)}"
            f" applied={applied}\n")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return line


def _read_site(site: Path) -> dict[str, Any]:
    return file_layer(site)[1] if site.exists() else {}


def stage_set(config: Path, site: Path, item: str) -> tuple[str, Any, Any, str, DuetConfig]:
    """Validate `KEY=VALUE` layered on the current files without touching them; errors name
    the user's files. Returns (key, old, new, new site text, new effective config)."""
    parts, value = parse_override(item)
    key = ".".join(parts)
    old = lookup(effective(config, site), key)
    data = _read_site(site)
    set_path(data, parts, value)
    new_cfg = validate_layers([file_layer(config), (str(site), data, site.absolute().parent)])
    text = _header(site) + yaml.safe_dump(data, sort_keys=False)
    return key, old, lookup(new_cfg, key), text, new_cfg


def _header(site: Path) -> str:
    """The comment lines that open the site file (install's "Site overrides layered on ..."),
    kept when the file is rewritten; the YAML dump would drop them."""
    if not site.exists():
        return ""
    lines = []
    for line in site.read_text().splitlines(keepends=True):
        if not line.lstrip().startswith("#"):
            break
        lines.append(line if line.endswith("\n") else line + "\n")
    return "".join(lines)


def is_tunable(key: str) -> bool:
    return key in TUNABLES


def renders_files(key: str) -> bool:
    """Whether the installed drop-ins or udev rules come from this key."""
    return any(key == p or key.startswith(p + ".") for p in DERIVED_KEY_PREFIXES)


def restart_hint(key: str, root: Path | None) -> str:
    """The restart that loads `key`, for the install at `root` (None: a workstation)."""
    if root is None:
        return f"restart needed: {WORKSTATION_RESTART}"
    top = key.split(".", 1)[0]
    unit = {"planner": "duet-planner.service", "recorder": "duet-recorder.service"}.get(top)
    if unit is None:
        # bus, robot, bundle, run_dir... are read by both processes
        unit = "duet-follower.service" if top == "follower" else "duet.target"
    return f"restart needed: {restart_command([unit], root)}"
