"""`duet bundle list | add | activate | rollback | verify | shadow | watch` (and actions other
features plug in through the `duet.bundle_commands` entry-point group, e.g. `create` with
export)."""

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
        cfg = load_config(config, site, cliopts.process_overrides(args))
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


def _shadow(args: argparse.Namespace) -> int:
    """Plan VERSION beside the active planner (no actuation) and report the divergence."""
    from runtime.ipc import endpoints
    from runtime.ipc.logs import setup_logging
    from runtime.model.bundle import BundleError
    from runtime.model.engines import EngineError
    from runtime.model.robot_bundle import robot_bundle
    from runtime.planner.pipeline import PipelineError
    from runtime.remote.shadow import run_shadow

    setup_logging()
    cfg, store = cliopts.load(args, "duet bundle shadow"), _store(args)
    path = store.root / args.version
    if not path.is_dir():
        known = ", ".join(b.version for b in store.list()) or "none"
        return fail("duet bundle shadow", f"no bundle {args.version!r} in {store.root} "
                    f"(installed: {known})")
    candidate = cfg.model_copy(update={"bundle": cfg.bundle.model_copy(
        update={"path": str(path)})})
    try:
        report = run_shadow(candidate, robot_bundle(candidate), args.duration, args.plans)
    except (BundleError, EngineError, PipelineError) as exc:
        return fail("duet bundle shadow", exc)
    div = report["divergence_rad"]
    lines = [f"shadow {report['candidate']} beside {report['active'] or '(no active plans)'}: "
             f"{report['plans']} plans compared, {report['skipped']} skipped"]
    if div:
        lines.append(f"divergence rad: mean {div['mean']:.4f}, p95 {div['p95']:.4f}, "
                     f"max {div['max']:.4f}")
        lines += [f"  {name:<16} mean {s['mean']:.4f}  p95 {s['p95']:.4f}"
                  for name, s in div["per_joint"].items()]
    lines.append(f"latency ms: candidate p50 {report['latency_ms']['p50']:g} / p99 "
                 f"{report['latency_ms']['p99']:g}, active p99 "
                 f"{report['active_latency_ms']['p99']:g}")
    lines.append(f"report: {Path(cfg.run_dir) / endpoints.SHADOW_REPORT}; then: "
                 f"duet bundle activate {report['candidate']} --if-shadow-ok")
    emit(args, "\n".join(lines), report)
    return 0


def _watch(args: argparse.Namespace) -> int:
    """The pending activation's watch (runtime/deploy/watch.py)."""
    from runtime.deploy.layout import store_root
    from runtime.deploy.units import WORKSTATION_RESTART, restart_command
    from runtime.deploy.watch import restart_services, watch
    from runtime.ipc.logs import setup_logging
    from runtime.ipc.signals import stop_on_signals
    from runtime.model.bundle import BundleError
    from runtime.stack.supervisor import RESTART_STACK_EXIT

    class Stop:
        stop_requested = False

    setup_logging()
    cfg, store, stop = cliopts.load(args, "duet bundle watch"), _store(args), Stop()
    stop_on_signals(stop)
    try:
        rec = watch(store, cfg, lambda: stop.stop_requested)
    except (BundleError, OSError) as exc:
        return fail("duet bundle watch", exc)
    if rec is None:
        emit(args, "no activation to watch", {"state": None})
        return 0
    emit(args, f"{rec['version']}: {rec['state']}"
         + (f" ({rec['reason']})" if rec.get("reason") else ""), rec)
    if rec["state"] != "rolled_back":
        return 0
    if args.restart_by_exit:
        return RESTART_STACK_EXIT  # `duet run` restarts the follower and the planner
    root = store_root(args.store)
    if root is not None and restart_command(root=root) != WORKSTATION_RESTART:
        restart_services()
    else:
        print(f"restart to load it: {WORKSTATION_RESTART}")
    return 0


def _activate(args: argparse.Namespace, store: Any) -> tuple[dict[str, Any], str]:
    """Gate (--if-shadow-ok), baseline, switch, arm the watch: (result, text); raises
    BundleError when refused."""
    from runtime.config import ConfigError, load_config
    from runtime.deploy.shadow_gate import refusals
    from runtime.deploy.watch import arm, baseline
    from runtime.model.bundle import BundleError
    from runtime.observe.rollout import shadow_report

    try:
        cfg = load_config(*cliopts.files(args), cliopts.process_overrides(args))
    except ConfigError:
        if args.if_shadow_ok:
            raise
        cfg = None  # no config here: no gate and no watch (their settings are the config's)
    if args.if_shadow_ok and cfg is not None:
        why = refusals(shadow_report(cfg.run_dir), args.version, store.current_version(), cfg)
        if why:
            raise BundleError(f"{args.version} not activated: the shadow report says\n  "
                              + "\n  ".join(why))
    watched = cfg is not None and cfg.bundle.watch.window_s > 0 \
        and store.current_version() not in (None, args.version)
    base = baseline(cfg.run_dir, cfg.bundle.watch.baseline_s) if watched and cfg else None
    old = store.activate(args.version)
    text = f"current: {args.version} (was {old})"
    if watched and cfg is not None:
        arm(store, cfg, args.version, old, base)
        text += (f"\nwatched for {cfg.bundle.watch.window_s:g} s after it plans; rolled back "
                 f"to {old} on a regression (baseline: "
                 f"{'the live robot now' if base else 'none, no live robot: faults only'})")
    return {"current": args.version, "was": old, "watched": watched, "baseline": base}, text


def _bundle(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError
    from runtime.deploy.layout import store_root
    from runtime.deploy.units import WORKSTATION_RESTART, restart_command
    from runtime.model.bundle import BundleError

    if args.bundle_cmd == "verify":
        return _verify(args)
    if args.bundle_cmd == "shadow":
        return _shadow(args)
    if args.bundle_cmd == "watch":
        return _watch(args)
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
            result, text = _activate(args, store)
        else:
            result = {"current": store.rollback()}
            text = f"rolled back: current is {result['current']}"
    except (BundleError, OSError, ConfigError) as exc:
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
    # the commands that read the live robot (its run dir, --set) as well as the store
    live = cliopts.shared(store=True, run_dir=True, overrides=True)
    p_act = sc(bsub, "activate", "make VERSION current (atomic symlink swap); its health is "
               "then watched and rolled back on a regression (bundle.watch)",
               "duet bundle activate 20250301-120000-ab12cd34 --if-shadow-ok", parents=[live])
    p_act.add_argument("version")
    p_act.add_argument("--if-shadow-ok", action="store_true",
                       help="only if the shadow report (duet bundle shadow VERSION) passes "
                            "bundle.shadow's thresholds")
    p_sh = sc(bsub, "shadow", "plan VERSION beside the active planner on the live robot, never "
              "actuating; report the divergence of their chunks and its latency",
              "duet bundle shadow 20250301-120000-ab12cd34 --plans 200", parents=[live])
    p_sh.add_argument("version")
    p_sh.add_argument("--plans", type=int, default=None, help="stop after this many compared")
    p_sh.add_argument("--duration", type=float, default=None, help="stop after this many s")
    p_w = sc(bsub, "watch", "watch the last activation's health; roll back on a regression "
             "(duet run and duet-watch.service start it)", "duet bundle watch", parents=[live])
    p_w.add_argument("--restart-by-exit", action="store_true",
                     help="after a rollback exit 3 (duet run restarts the stack) instead of "
                          "restarting the services")
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
