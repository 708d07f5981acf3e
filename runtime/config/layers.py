"""Loading a config: YAML files layered (robot < site < --set), each read with bounds (size,
nodes, depth, plain types only), merged, and validated into the schema (schema.py). An invalid
config is rejected with the file, the key path and the reason; nothing starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from drivers.families import FAMILIES
from runtime.config.schema import ConfigError, DuetConfig

MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 32


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML layer; every way it can fail is a ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_yaml(raw, path)


def parse_yaml(raw: bytes, path: str | Path) -> dict[str, Any]:
    """One YAML layer from its bytes (`path` names it in errors)."""
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes; a config is at most {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    data = load_plain_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    check_plain(data, str(path))
    return data


# The YAML tags a config may hold: JSON's types. Every other tag a safe loader knows (a date
# or timestamp, binary, set, omap, pairs) is refused with its key, before any constructor
# runs: PyYAML's own constructors crash on some explicitly tagged values (`!!timestamp x`
# raises AttributeError, `!!int _` IndexError, `!!bool x` KeyError).
_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = frozenset(_YAML + t for t in ("str", "int", "float", "bool", "null"))
# an explicit tag -> the tags the resolver may give its text untagged (`!!float 1` is 1.0)
_FITS = {_YAML + "int": {"int"}, _YAML + "float": {"int", "float"}, _YAML + "bool": {"bool"},
         _YAML + "null": {"null"}}


def load_plain_yaml(text: str, where: str) -> Any:
    """Parse YAML text that may only hold plain data; ConfigError naming `where` and the key
    for anything else (a tag outside JSON's types, a value its explicit tag does not fit)."""
    try:
        loader = yaml.SafeLoader(text)  # its reader refuses unprintable characters already
        try:
            node = loader.get_single_node()
            if node is None:
                return None
            _check_tags(loader, node, where)
            return loader.construct_document(node)
        finally:
            loader.dispose()
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of > 4300 digits
        raise ConfigError(f"{where}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply") from None


def _check_tags(loader: yaml.SafeLoader, root: yaml.Node, where: str) -> None:
    """Every node's tag is a plain one, and an explicitly tagged int/float/bool/null is one the
    resolver would give that text untagged (what the constructors can take). Each node once:
    aliases share nodes, and a YAML bomb must not blow up this walk."""
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    while stack:
        node, key = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            plain, what = node.tag == _YAML + "map", " on a mapping"
            for k, v in node.value:
                path = _key_path(key, k.value if isinstance(k, yaml.ScalarNode) else "?")
                if k.tag != _YAML + "merge":  # `<<: *anchor`: the safe loader's merge key
                    stack.append((k, path))
                stack.append((v, path))
        elif isinstance(node, yaml.SequenceNode):
            plain, what = node.tag == _YAML + "seq", " on a list"
            stack.extend((v, f"{key}[{i}]") for i, v in enumerate(node.value))
        else:
            plain, what = node.tag in _PLAIN_TAGS, ""
        at = f"{where}: {key}" if key else where
        if not plain:
            raise ConfigError(f"{at}: {_tag_name(node.tag)}{what} is not allowed: a config"
                              " holds mappings, lists, strings, numbers, booleans and null"
                              " (a date or timestamp? quote it)")
        fits = _FITS.get(node.tag)
        if fits is not None and loader.resolve(yaml.ScalarNode, node.value, (True, False)
                                               ).removeprefix(_YAML) not in fits:
            raise ConfigError(f"{at}: {node.value!r} is not a valid {_tag_name(node.tag)}")


def _key_path(parent: str, name: str) -> str:
    return f"{parent}.{name}" if parent else name


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_YAML) if tag.startswith(_YAML) else tag


def validate(merged: dict[str, Any], layers: list[tuple[str, dict[str, Any]]]) -> DuetConfig:
    """The merged layers as a DuetConfig; ConfigError naming each key's layer and reason."""
    try:
        return DuetConfig.model_validate(merged)
    except (OverflowError, RecursionError) as exc:
        raise ConfigError(f"invalid config: {exc.__class__.__name__}: {exc}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            # drop the union tag pydantic inserts into the location of discriminated unions
            loc = tuple(p for p in err["loc"] if p not in FAMILIES)
            key = ".".join(str(p) for p in loc) or "<root>"
            hint = ""
            if err["type"] == "extra_forbidden":
                near = close_keys(key)
                hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            lines.append(f"{_origin(loc, layers)}: {key}: {err['msg']}{hint}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def check_plain(data: Any, where: str) -> None:
    """A config is plain data: mappings with string keys, lists, strings, numbers, bools,
    null; bounded in depth and size (YAML aliases can make a small file a huge tree)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    nodes = 0
    while stack:
        node, key, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise ConfigError(f"{where}: too large or nested too deeply (at {key or '<root>'})")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{where}: {key or '<root>'}: key {k!r} is not a string")
                stack.append((v, f"{key}.{k}" if key else k, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{key}[{i}]", depth + 1) for i, v in enumerate(node))
        elif node is not None and not isinstance(node, (str, int, float, bool)):
            at = f"{where}: {key}" if key else where
            raise ConfigError(f"{at}: {type(node).__name__} values are not allowed "
                              f"(a date or timestamp? quote it)")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment")
    value = load_plain_yaml(raw, f"--set {key}")
    check_plain(value, f"--set {key}")
    return parts, value


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """data[a][b][c] = value for parts [a, b, c], creating mappings on the way."""
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts)}: {part!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _origin(key_path: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str:
    """Which layer last set this key (so the error names the right file)."""
    for name, layer in reversed(layers):
        node: Any = layer
        found = True
        for part in key_path:
            in_dict = isinstance(node, dict) and part in node
            in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
            if in_dict or in_list:
                node = node[part]
            else:
                found = False
                break
        if found:
            return name
    return layers[0][0] if layers else "<config>"


# Config values that are file system paths: a relative one is relative to the file that set it
# (the --set layer: to the working directory), so a config means the same from any folder.
PATH_KEYS = (("bundle", "path"), ("bundle", "public_key"), ("bundle", "engine_cache"),
             ("recorder", "dir"), ("run_dir",), ("state_dir",), ("sim", "robot", "mjcf"))

Layer = tuple[str, dict[str, Any], Path]  # (name for errors, data, folder its paths are from)


def _anchor_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for key in PATH_KEYS:
        node: Any = out
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(key[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            # normpath, not resolve(): a `current` symlink must stay a symlink
            node[key[-1]] = os.path.normpath(base / value)
    return out


def file_layer(path: str | Path) -> Layer:
    path = Path(path)
    return (str(path), _read_yaml(path), Path(os.path.abspath(path)).parent)


def override_layer(overrides: list[str]) -> Layer:
    cli: dict[str, Any] = {}
    for item in overrides:
        parts, value = parse_override(item)
        set_path(cli, parts, value)
    return ("--set", cli, Path.cwd())


def load_config(
    path: str | Path,
    site: str | Path | None = None,
    overrides: list[str] | None = None,
) -> DuetConfig:
    """Load `path`, layer the site file and `--set` overrides on top, validate."""
    layers = [file_layer(path)]
    if site is not None and Path(site).exists():
        layers.append(file_layer(site))
    if overrides:
        layers.append(override_layer(overrides))
    return validate_layers(layers)


def validate_layers(layers: list[Layer]) -> DuetConfig:
    """Merge the layers (later wins) and validate; errors name the layer that set the key."""
    anchored = [(name, _anchor_paths(data, base)) for name, data, base in layers]
    merged: dict[str, Any] = {}
    for _, layer in anchored:
        merged = _deep_merge(merged, layer)
    return validate(merged, anchored)


def known_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every key path of the schema, e.g. `follower.realtime.cpu` (a list is one key)."""
    out = []
    for name, field in (model or DuetConfig).model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        for sub in _models_in(field.annotation):
            out += known_keys(sub, f"{path}.")
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field holds directly (through unions and Annotated, not lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if getattr(annotation, "__origin__", None) is list:
        return []
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _models_in(arg)]


def close_keys(key: str, n: int = 2) -> list[str]:
    """Schema keys close to a mistyped `key` (difflib), for "did you mean"."""
    import difflib

    return difflib.get_close_matches(key, sorted(set(known_keys())), n=n, cutoff=0.75)


def config_to_dict(cfg: DuetConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
