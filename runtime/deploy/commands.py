"""`duet install | bundle | config | status | top | doctor | record` (field deployment)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from runtime.deploy.layout import DEFAULT_PREFIX, Layout

ETC = Layout()


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, default=ETC.config, help="robot config YAML")
    p.add_argument("--site", type=Path, default=ETC.site, help="site overrides YAML")


def _run_dir(args: argparse.Namespace) -> str:
    """--run-dir, else the config's run_dir, else the default."""
    if getattr(args, "run_dir", None):
        return str(args.run_dir)
    from runtime.config import ConfigError, load_config

    try:
        return load_config(args.config, args.site).run_dir
    except ConfigError:
        return "/run/duet"


def _fail(prefix: str, exc: Exception) -> int:
    print(f"duet {prefix}: {exc}", file=sys.stderr)
    return 1


# ---------------------------------------------------------------------- install
def _install(args: argparse.Namespace) -> int:
    from runtime.bundle import BundleError
    from runtime.config import ConfigError
    from runtime.deploy.install import InstallError, InstallPlan, ensure_root_user, install

    plan = InstallPlan(layout=Layout(Path(args.root)), prefix=args.prefix,
                       config=Path(args.config), bundle=args.bundle,
                       usb_serial=args.usb_serial, venv=not args.no_venv)
    try:
        ensure_root_user(plan)
        install(plan)
    except (BundleError, ConfigError, InstallError, OSError) as exc:
        return _fail("install", exc)
    if plan.live:
        print("installed. start with: systemctl start duet.target ; check with: duet doctor")
    return 0


# ---------------------------------------------------------------------- bundle
def _store(args: argparse.Namespace) -> Any:
    from runtime.config import ConfigError, load_config
    from runtime.deploy.bundle_store import BundleStore

    key, joints = None, None
    try:
        cfg = load_config(args.config, args.site)
        key, joints = cfg.bundle.public_key, list(cfg.robot.joints)
    except ConfigError:
        pass  # the store still works; verification then skips key and joint checks
    return BundleStore(Path(args.store), key, joints)


def _bundle(args: argparse.Namespace) -> int:
    from runtime.bundle import BundleError

    store = _store(args)
    try:
        if args.bundle_cmd == "list":
            rows = store.list()
            if not rows:
                print(f"no bundles in {store.root}")
            for b in rows:
                mark = "*" if b.current else ("<" if b.previous else " ")
                print(f"{mark} {b.version:<40} {b.created}")
            print("(* current, < previous)" if rows else "", end="\n" if rows else "")
            return 0
        if args.bundle_cmd == "add":
            print(f"added {store.add(Path(args.dir))}")
            return 0
        if args.bundle_cmd == "activate":
            old = store.activate(args.version)
            print(f"current: {args.version} (was {old})")
        else:
            print(f"rolled back: current is {store.rollback()}")
    except (BundleError, OSError) as exc:
        return _fail("bundle", exc)
    print("restart to load it: systemctl restart duet.target")
    return 0


# ---------------------------------------------------------------------- config
def _config(args: argparse.Namespace) -> int:
    import yaml

    from runtime.config import ConfigError, config_to_dict, load_config
    from runtime.deploy import config_edit as ce

    site: Path | None = args.site
    try:
        if args.config_cmd == "validate":
            if args.file is not None:
                load_config(args.file)
                print(f"ok: {args.file}")
            else:
                ce.effective(args.config, site)
                print(f"ok: {args.config}" + (f" + {site}" if site and site.exists() else ""))
        elif args.config_cmd == "show":
            if args.effective:
                cfg = ce.effective(args.config, site)
                print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False), end="")
            else:
                for path in (args.config, site):
                    if path is not None and path.exists():
                        print(f"# --- {path}\n{path.read_text()}", end="")
        elif args.config_cmd == "diff":
            rows = ce.diff(args.config, site)
            for key, shipped, eff in rows:
                print(f"{key}: {json.dumps(shipped)} -> {json.dumps(eff)}")
            if not rows:
                print("no site changes")
        else:
            return _config_set(args, ce)
    except ConfigError as exc:
        return _fail("config", exc)
    return 0


def _config_set(args: argparse.Namespace, ce: Any) -> int:
    from runtime import endpoints
    from runtime.rpc import ControlError, request_at

    key, old, new, text, cfg = ce.stage_set(args.config, args.site, args.item)
    if old == new:
        print(f"{key} is already {json.dumps(new)}")
        return 0
    ce.atomic_write(args.site, text)
    print(f"{key}: {json.dumps(old)} -> {json.dumps(new)} (saved to {args.site})")
    rc = 0
    if ce.is_tunable(key):
        run_dir = args.run_dir or cfg.run_dir
        try:
            reply = request_at(endpoints.control(run_dir), "set", {"key": key, "value": new},
                               timeout_s=args.timeout)
        except ControlError:
            applied = "next-start"
            print("follower not running: takes effect when it starts")
        else:
            if reply["ok"]:
                applied = "live"
                print("applied live")
            else:
                applied = "failed"
                print(f"follower refused it live: {reply['error']}")
                print(ce.restart_hint(key))
                rc = 1
    else:
        applied = "restart"
        print(ce.restart_hint(key))
    ce.log_change(args.log, key, old, new, applied)
    return rc


# ---------------------------------------------------------------------- status / top
def _status(args: argparse.Namespace) -> int:
    from runtime.deploy import status

    return status.run(args, _run_dir(args))


def _top(args: argparse.Namespace) -> int:
    from runtime.deploy.top import run_top

    return run_top(_run_dir(args), args.refresh_hz, args.duration)


# ---------------------------------------------------------------------- doctor
def _doctor(args: argparse.Namespace) -> int:
    from runtime.deploy.doctor import diagnose, report

    text, rc = report(diagnose(args.config, args.site))
    print(text)
    return rc


# ---------------------------------------------------------------------- record
def _record(args: argparse.Namespace) -> int:
    if args.record_cmd == "serve":
        return _record_serve(args)
    if args.record_cmd == "info":
        return _record_info(Path(args.file))
    from runtime import endpoints
    from runtime.config import ConfigError, load_config
    from runtime.rpc import ControlError, request_at

    run_dir = args.run_dir
    if run_dir is None:
        try:
            run_dir = load_config(args.config, args.site).run_dir
        except ConfigError as exc:
            return _fail("record", exc)
    body = {"name": args.name} if args.record_cmd == "start" else {}
    try:
        reply = request_at(endpoints.recorder(run_dir), args.record_cmd, body, timeout_s=3.0)
    except ControlError:
        return _fail("record", RuntimeError(
            f"no recorder answering in {run_dir}: systemctl start duet-recorder "
            "(or run `duet record serve`)"))
    if not reply["ok"]:
        return _fail("record", RuntimeError(reply["error"]))
    print(json.dumps(reply["result"], indent=2))
    return 0


def _record_info(path: Path) -> int:
    from collections import Counter

    from runtime.deploy.mcap_sink import read_recording

    try:
        contents = read_recording(path)
    except OSError as exc:
        return _fail("record info", exc)
    counts = Counter(topic for topic, *_ in contents.messages)
    for topic, n in sorted(counts.items()):
        print(f"{topic:<22} {n:>8}")
    times = [t for _, _, t, _ in contents.messages]
    span = (max(times) - min(times)) / 1e9 if times else 0.0
    state = "complete" if contents.complete else f"cut off ({contents.error}); complete chunks read"
    print(f"{len(times)} messages over {span:.1f} s, {state}")
    return 0


def _record_serve(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError, load_config
    from runtime.deploy.recorder import serve
    from runtime.logs import setup_logging

    setup_logging()
    try:
        cfg = load_config(args.config, args.site, args.set)
    except ConfigError as exc:
        return _fail("record serve", exc)
    run_dir = args.run_dir or cfg.run_dir
    meta = {"robot": cfg.robot.name, "joints": ",".join(cfg.robot.joints),
            "config": str(args.config), "bundle": cfg.bundle.path}
    return serve(run_dir, Path(args.dir or cfg.recorder.dir), cfg.recorder.ring_s,
                 cfg.recorder.budget_mb, meta, continuous=args.continuous,
                 frame_hz=args.frame_hz, duration_s=args.duration)


# ---------------------------------------------------------------------- parser
def _common(run_dir: bool = False, store: bool = False) -> argparse.ArgumentParser:
    """Options every subcommand of a group takes, accepted after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    _config_args(p)
    if run_dir:
        p.add_argument("--run-dir", default=None, help="runtime dir (default: config)")
    if store:
        p.add_argument("--store", type=Path, default=ETC.bundles, help="bundle store folder")
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("install", help="install duet on this robot (or into --root)")
    p.add_argument("--root", default="/", help="stage into this tree instead of /")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the virtualenv goes")
    p.add_argument("--config", type=Path, default=Path("configs/sim.yaml"),
                   help="robot config to install as /etc/duet/duet.yaml")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder to install")
    p.add_argument("--usb-serial", default=None,
                   help="USB serial number of the bus adapter (stable udev match)")
    p.add_argument("--no-venv", action="store_true", help="skip creating the virtualenv")
    p.set_defaults(func=_install)

    common = _common(store=True)
    p = sub.add_parser("bundle", help="installed bundles: list, add, activate, rollback")
    bsub = p.add_subparsers(dest="bundle_cmd", required=True, metavar="CMD")
    bsub.add_parser("list", parents=[common], help="installed bundles, current/previous marked")
    bsub.add_parser("add", parents=[common], help="verify and copy a bundle in").add_argument(
        "dir")
    bsub.add_parser("activate", parents=[common], help="make VERSION current").add_argument(
        "version")
    bsub.add_parser("rollback", parents=[common], help="make the previous bundle current")
    p.set_defaults(func=_bundle)

    common = _common(run_dir=True)
    common.add_argument("--log", type=Path, default=ETC.change_log, help="config change log")
    common.add_argument("--timeout", type=float, default=2.0, help="live-apply timeout, s")
    p = sub.add_parser("config", help="validate, show, set, diff the robot config")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="CMD")
    csub.add_parser("validate", parents=[common], help="check FILE (default: config + site)"
                    ).add_argument("file", nargs="?", type=Path, default=None)
    csub.add_parser("show", parents=[common], help="the config files, or --effective"
                    ).add_argument("--effective", action="store_true",
                                   help="merged and validated, with defaults")
    csub.add_parser("set", parents=[common], help="KEY=VALUE into the site file; live when "
                    "tunable").add_argument("item", metavar="KEY=VALUE")
    csub.add_parser("diff", parents=[common], help="effective config vs the shipped config")
    p.set_defaults(func=_config)

    from runtime.deploy.status import add_arguments

    p = sub.add_parser("status", help="one telemetry sample of follower and planner")
    add_arguments(p)
    p.set_defaults(func=_status)

    p = sub.add_parser("top", help="live follower/planner view for an SSH terminal")
    _config_args(p)
    p.add_argument("--run-dir", default=None, help="runtime dir (default: config)")
    p.add_argument("--refresh-hz", type=float, default=4.0)
    p.add_argument("--duration", type=float, default=None, help="quit after this many seconds")
    p.set_defaults(func=_top)

    p = sub.add_parser("doctor", help="check devices, real-time, clock, bundle, engine, disk")
    _config_args(p)
    p.set_defaults(func=_doctor)

    common = _common(run_dir=True)
    p = sub.add_parser("record", help="flight recorder: serve, start NAME, stop, status")
    rsub = p.add_subparsers(dest="record_cmd", required=True, metavar="CMD")
    s = rsub.add_parser("serve", parents=[common], help="the recorder process "
                        "(duet-recorder.service)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--dir", default=None, help="recordings folder (default: recorder.dir)")
    s.add_argument("--continuous", action="store_true", help="also record everything, rotated")
    s.add_argument("--frame-hz", type=float, default=2.0, help="camera frames kept per second")
    s.add_argument("--duration", type=float, default=None)
    rsub.add_parser("start", parents=[common], help="start the named episode").add_argument(
        "name")
    rsub.add_parser("stop", parents=[common], help="stop the episode")
    rsub.add_parser("status", parents=[common], help="what the recorder is doing")
    rsub.add_parser("info", help="topics and message counts of a recording (also a cut-off "
                    "one)").add_argument("file")
    p.set_defaults(func=_record)
