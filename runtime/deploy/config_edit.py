"""Config over SSH: validate, show, set (atomic, backed up, logged, applied live), diff.

Operator changes go into the site file (/etc/duet/site.yaml), layered on the shipped robot
config (/etc/duet/duet.yaml), so `duet config diff` always shows what the site changed.
"""

from __future__ import annotations

import getpass
import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from runtime.config import (
    TUNABLES,
    ConfigError,
    DuetConfig,
    config_to_dict,
    load_config,
    parse_override,
    set_path,
)


def effective(config: Path, site: Path | None) -> DuetConfig:
    return load_config(config, site if site is not None and site.exists() else None)


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
            raise ConfigError(f"{key}: no such key")
        node = node[part]
    return node


def atomic_write(path: Path, text: str, backup: bool = True) -> None:
    """Write via a temp file in the same folder + rename; keep the old file as PATH.bak."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.chmod(tmp, path.stat().st_mode & 0o7777)
            if backup:
                bak = path.with_name(path.name + ".bak")
                bak.write_bytes(path.read_bytes())
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def who() -> str:
    """The person behind the change: the sudo caller when run through sudo."""
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or getpass.getuser()


def _flow(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...")


def log_change(log: Path, key: str, old: Any, new: Any, applied: str) -> str:
    stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
    line = (f"{stamp} user={who()} key={key} old={_flow(old)} new={_flow(new)}"
            f" applied={applied}\n")
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a") as f:
        f.write(line)
    return line


def _read_site(site: Path) -> dict[str, Any]:
    if not site.exists():
        return {}
    data = yaml.safe_load(site.read_text())
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{site}: top level must be a mapping")
    return data


def stage_set(config: Path, site: Path, item: str) -> tuple[str, Any, Any, str, DuetConfig]:
    """Validate `KEY=VALUE` layered on the current files without touching them.
    Returns (key, old, new, new site text, new effective config)."""
    parts, value = parse_override(item)
    key = ".".join(parts)
    current = effective(config, site)
    old = lookup(current, key)
    data = _read_site(site)
    set_path(data, parts, value)
    text = yaml.safe_dump(data, sort_keys=False)
    folder = site.parent if site.parent.is_dir() else None
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=folder, delete=False) as tmp:
        tmp.write(text)
    try:
        new_cfg = load_config(config, tmp.name)
    finally:
        os.unlink(tmp.name)
    return key, old, lookup(new_cfg, key), text, new_cfg


def is_tunable(key: str) -> bool:
    return key in TUNABLES


def restart_hint(key: str) -> str:
    top = key.split(".", 1)[0]
    unit = {"planner": "duet-planner", "recorder": "duet-recorder"}.get(top)
    if unit is None:
        # bus, robot, bundle, run_dir... are read by both processes
        unit = "duet-follower" if top == "follower" else "duet.target"
    return f"restart needed: systemctl restart {unit}"
