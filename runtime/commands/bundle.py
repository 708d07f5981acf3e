"""`duet bundle list | add | activate | rollback` (and actions other features plug in
through the `duet.bundle_commands` entry-point group, e.g. `create` with export)."""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from runtime.commands import options as cliopts
from runtime.commands.options import emit, fail


def _store(args: argparse.Namespace) -> Any:
    from runtime.config import ConfigError, load_config
    from runtime.deploy.bundle_store import BundleStore

    key, joints, floor = None, None, None
    config, site = cliopts.files(args)
    try:
        cfg = load_config(config, site)
        key, joints = cfg.bundle.public_key, list(cfg.robot.joints)
        floor = cfg.bundle.min_version
    except ConfigError:
        pass  # the store still works; verification then skips key and joint checks
    return BundleStore(Path(args.store), key, joints, floor)


def _verify(args: argparse.Namespace) -> int:
    """The configured bundle, verified as the planner will load it; run as root (the planner
    unit's ExecStartPre=+), it leaves the boot's verified stamp (runtime/model/verified.py)."""
    import time

    from runtime.config import ConfigError, load_config
    from runtime.model.bundle import BundleError, load_bundle

    config, site = cliopts.files(args)
    t0 = time.monotonic()
    try:
        cfg = load_config(config, site)
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, list(cfg.robot.joints))
    except (ConfigError, BundleError) as exc:
        return fail("duet bundle verify", exc)
    emit(args, f"verified {bundle.version} ({len(bundle.files)} files) in "
         f"{time.monotonic() - t0:.2f} s", {"version": bundle.version,
                                            "files": len(bundle.files)})
    return 0


def _bundle(args: argparse.Namespace) -> int:
    from runtime.deploy.layout import store_root
    from runtime.deploy.units import WORKSTATION_RESTART, restart_command
    from runtime.model.bundle import BundleError

    if args.bundle_cmd == "verify":
        return _verify(args)
    store = _store(args)
    try:
        if args.bundle_cmd == "list":
            rows = store.list()
            lines = [f"{'*' if b.current else ('<' if b.previous else ' ')} "
                     f"{b.version:<40} {b.created}" for b in rows]
            text = "\n".join([*lines, "(* current, < previous)"]) if rows \
                else f"no bundles in {store.root}"
            emit(args, text, [{"version": b.version, "current": b.current,
                               "previous": b.previous, "created": b.created} for b in rows])
            return 0
        if args.bundle_cmd == "add":
            version = store.manifest_version(Path(args.dir))
            added = store.add(Path(args.dir))
            emit(args, f"added {version}; make it current: duet bundle activate {version}"
                 if added else f"{version} is already installed (identical): nothing to do",
                 {"version": version, "added": added})
            return 0
        if args.bundle_cmd == "activate":
            old = store.activate(args.version)
            result = {"current": args.version, "was": old}
            text = f"current: {args.version} (was {old})"
        else:
            result = {"current": store.rollback()}
            text = f"rolled back: current is {result['current']}"
    except (BundleError, OSError) as exc:
        return fail("duet bundle", exc)
    root = store_root(args.store)
    restart = WORKSTATION_RESTART if root is None else restart_command(root=root)
    emit(args, f"{text}\nrestart to load it: {restart}", {**result, "restart": restart})
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sc = cliopts.subcommand
    shared = cliopts.shared(store=True)
    p = sc(sub, "bundle", "installed bundles: list, add, activate, rollback",
           "duet bundle list")
    bsub = p.add_subparsers(dest="bundle_cmd", required=True, metavar="CMD")
    sc(bsub, "list", "installed bundles, current/previous marked", "duet bundle list",
       parents=[shared])
    sc(bsub, "add", "verify a bundle (hashes, signature, joints) and copy it in",
       "duet bundle add /media/usb/bundle-20250301", parents=[shared]).add_argument("dir")
    sc(bsub, "activate", "make VERSION current (atomic symlink swap)",
       "duet bundle activate 20250301-120000-ab12cd34", parents=[shared]).add_argument(
        "version")
    sc(bsub, "rollback", "make the previous bundle current", "duet bundle rollback",
       parents=[shared])
    sc(bsub, "verify", "verify the configured bundle (as root: once per boot, stamped)",
       "duet bundle verify --config /etc/duet/duet.yaml", parents=[cliopts.shared()])
    for ep in entry_points(group="duet.bundle_commands"):  # e.g. `create`, with export
        try:
            ep.load()(bsub)
        except ModuleNotFoundError:
            pass  # that feature is not installed here
    p.set_defaults(func=_bundle)
