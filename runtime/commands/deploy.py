"""`duet install | uninstall | bundle | config | status | top | doctor | record | view`
(field deployment). Shared options and exit codes: runtime/commands/options.py."""

from __future__ import annotations

import argparse
import errno
import json
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from runtime.commands import options as cliopts
from runtime.commands.options import EXIT_FAILED, EXIT_USAGE, emit, fail
from runtime.deploy.layout import DEFAULT_PREFIX, Layout


# ---------------------------------------------------------------------- install
def _install(args: argparse.Namespace) -> int:
    import tempfile

    from runtime.config import ConfigError
    from runtime.deploy.archive import ArchiveError, unpack
    from runtime.deploy.install import InstallError, InstallPlan, install, restart_command
    from runtime.deploy.steps import log_to_stderr, run_to_stderr
    from runtime.model.bundle import BundleError

    if args.sha256 is not None and args.offline is None:
        return fail("duet install", "--sha256 checks an --offline ARCHIVE: give both",
                    EXIT_USAGE)
    if args.config is None and args.offline is None:
        return fail("duet install", "--config FILE is required (or --offline ARCHIVE, which "
                    "carries one)", EXIT_USAGE)
    plan = InstallPlan(layout=Layout(Path(args.root)), prefix=args.prefix,
                       config=args.config, bundle=args.bundle,
                       usb_serial=args.usb_serial, venv=not args.no_venv,
                       source=args.source, udev_reload=args.udev_reload)
    if args.json:  # progress to stderr: stdout is the one JSON object
        plan.run, plan.log = run_to_stderr, log_to_stderr
    with tempfile.TemporaryDirectory(prefix="duet-offline-") as tmp:
        try:
            if args.offline is not None:  # everything from the verified archive, no network
                got = unpack(args.offline, Path(tmp), args.sha256, check_target=plan.venv)
                plan.config = args.config or got.config
                plan.bundle = args.bundle or got.bundle
                plan.source = args.source or got.source
                plan.package, plan.wheelhouse = got.wheel, got.wheels
                plan.log(f"{args.offline}: {len(got.manifest['files'])} files verified (sha256), "
                      f"packed for {got.manifest['target']['machine']} Python "
                      f"{got.manifest['target']['python']}")
            done = install(plan)
        except (ConfigError, ArchiveError) as exc:
            return fail("duet install", exc, EXIT_USAGE)
        except (BundleError, InstallError, OSError) as exc:
            return fail("duet install", exc)
    hint = (f"start: sudo systemctl start duet.target ; check: duet doctor ; after a change: "
            f"{restart_command()}") if plan.live else f"staged under {plan.layout.root}"
    emit(args, f"installed. {hint}", {
        "installed": True, "enabled": done.enabled, "root": str(plan.layout.root),
        "offline": args.offline is not None,
        "l4t": done.l4t.name if done.l4t is not None else None,
        "jetpack": done.l4t.jetpack if done.l4t is not None else None,
        "onnxruntime": done.onnxruntime or None})
    return 0


def _pack(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError
    from runtime.deploy.archive import ArchiveError, Target, pack
    from runtime.deploy.layout import find_source
    from runtime.deploy.steps import StepFailed, log_to_stderr, run_checked, run_to_stderr
    from runtime.model.bundle import BundleError

    try:
        target = Target(args.platform, args.python, args.glibc)
        source = args.source or find_source()
        if source is None:
            raise ArchiveError("not in a duet source tree: run duet pack from the checkout, or "
                               "pass --source DIR")
        out = args.out or Path(f"duet-{target.label}.tar.gz")
        result = pack(args.config, args.bundle, target, out, source,
                      run=run_to_stderr if args.json else run_checked,
                      log=log_to_stderr if args.json else print)
    except StepFailed as exc:
        return fail("duet pack", exc)
    except (ConfigError, ArchiveError, BundleError) as exc:
        return fail("duet pack", exc, EXIT_USAGE)
    emit(args, "", result)
    return 0


def _uninstall(args: argparse.Namespace) -> int:
    from runtime.deploy.install import InstallError, uninstall

    try:
        removed = uninstall(Layout(Path(args.root)), args.prefix, args.purge)
    except (InstallError, OSError) as exc:
        return fail("duet uninstall", exc)
    emit(args, "uninstalled", {"removed": [str(p) for p in removed], "purge": args.purge})
    return 0


# ---------------------------------------------------------------------- bundle
def _store(args: argparse.Namespace) -> Any:
    from runtime.config import ConfigError, load_config
    from runtime.deploy.bundle_store import BundleStore

    key, joints = None, None
    config, site = cliopts.files(args)
    try:
        cfg = load_config(config, site)
        key, joints = cfg.bundle.public_key, list(cfg.robot.joints)
    except ConfigError:
        pass  # the store still works; verification then skips key and joint checks
    return BundleStore(Path(args.store), key, joints)


def _bundle(args: argparse.Namespace) -> int:
    from runtime.deploy.install import restart_command
    from runtime.model.bundle import BundleError

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
    emit(args, f"{text}\nrestart to load it: {restart_command()}", result)
    return 0


# ---------------------------------------------------------------------- config
def _config(args: argparse.Namespace) -> int:
    import yaml

    from runtime.config import ConfigError, config_to_dict, load_config
    from runtime.deploy import config_edit as ce

    config, site = cliopts.files(args)
    try:
        if args.config_cmd == "validate":
            return _validate(args, config, site)
        if args.config_cmd == "show":
            if args.effective or args.json:
                data = config_to_dict(ce.effective(config, site))
                emit(args, yaml.safe_dump(data, sort_keys=False).rstrip(), data)
            else:
                for path in (config, site):
                    if path is not None and path.exists():
                        print(f"# --- {path}\n{path.read_text()}", end="")
            return 0
        if args.config_cmd == "diff":
            load_config(config)  # a broken shipped config is the error to show
            rows = ce.diff(config, site)
            emit(args, "\n".join(f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, a, b in rows)
                 or "no site changes", [{"key": k, "shipped": a, "effective": b}
                                        for k, a, b in rows])
            return 0
        if site is None:
            return fail("duet config set", f"no site file to edit: pass --site FILE (the layer "
                        f"`config set` writes, on top of {config})", EXIT_USAGE)
        return _config_set(args, ce, config, site)
    except ConfigError as exc:
        return fail(f"duet config {args.config_cmd}", exc, EXIT_USAGE)
    except OSError as exc:  # e.g. a root-owned site file
        hint = " (run it with sudo)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return fail(f"duet config {args.config_cmd}",
                    f"{exc.filename or ''}: {exc.strerror}{hint}".lstrip(": "))


def _validate(args: argparse.Namespace, config: Path, site: Path | None) -> int:
    """Every start-time check: schema and bus budget (exit 2), then bundle contract and
    devices (exit 1). `nginx -t` for duet."""
    from runtime.config import load_config
    from runtime.deploy.preflight import problems

    if args.file is not None:
        config, site = args.file, None
    files = [f for f in (config, site) if f is not None and (f is config or f.exists())]
    cfg = load_config(config, files[1] if len(files) > 1 else None, args.set)
    found = problems(cfg)
    names = " + ".join(str(f) for f in files)
    emit(args, "\n".join([f"FAIL {p}" for p in found] + [
        f"{'invalid' if found else 'ok'}: {names}" + (f" ({len(found)} problems)"
                                                      if found else "")]),
         {"ok": not found, "files": [str(f) for f in files], "problems": found})
    return EXIT_FAILED if found else 0


def _config_set(args: argparse.Namespace, ce: Any, config: Path, site: Path) -> int:
    from runtime.deploy.install import rerender
    from runtime.deploy.journal import Journal, atomic_write
    from runtime.deploy.layout import change_log, installed_root
    from runtime.deploy.steps import StepFailed, external, run_checked
    from runtime.ipc import endpoints
    from runtime.ipc.rpc import ControlError, request_at

    log = args.log or change_log(site)
    out: dict[str, Any] = {}
    lines: list[str] = []
    rc = 0
    with ce.locked(site):  # read, validate, write, log: one critical section
        key, old, new, text, cfg = ce.stage_set(config, site, args.item)
        out.update(key=key, old=old, new=new)
        if old == new:
            emit(args, f"{key} is already {json.dumps(new)}", {**out, "applied": "unchanged"})
            return 0
        atomic_write(site, text, backup=site.exists())
        lines.append(f"{key}: {json.dumps(old)} -> {json.dumps(new)} (saved to {site})")
        root = installed_root(site)
        rendered = rerender(Layout(root), cfg, Journal()) if root is not None and \
            ce.renders_files(key) else []
        if rendered:
            lines.append("re-rendered " + ", ".join(str(p) for p in rendered))
            if root == Path("/"):
                try:
                    external(run_checked, ["systemctl", "daemon-reload"],
                             "is systemd running? then: sudo systemctl daemon-reload")
                except StepFailed as exc:
                    lines.append(str(exc))
                    rc = EXIT_FAILED
        if ce.is_tunable(key):
            run_dir = cliopts.run_dir(args)
            try:
                reply = request_at(endpoints.control(run_dir), "set",
                                   {"key": key, "value": new}, timeout_s=args.timeout)
            except ControlError:
                applied = "next-start"
                lines.append(f"follower not running in {run_dir}: takes effect when it starts")
            else:
                if reply["ok"]:
                    applied = "live"
                    lines.append("applied live")
                else:
                    applied = "failed"
                    lines += [f"follower refused it live: {reply['error']}", ce.restart_hint(key)]
                    rc = EXIT_FAILED
        else:
            applied = "restart"
            lines.append(ce.restart_hint(key))
        ce.log_change(log, key, old, new, applied)
    emit(args, "\n".join(lines), {**out, "applied": applied, "site": str(site),
                                  "rendered": [str(p) for p in rendered], "log": str(log)})
    return rc


# ---------------------------------------------------------------------- status / top / view
def _status(args: argparse.Namespace) -> int:
    from runtime.observe import status

    return status.run(args, cliopts.run_dir(args))


def _top(args: argparse.Namespace) -> int:
    from runtime.observe.top import run_top

    return run_top(cliopts.run_dir(args), args.refresh_hz, args.duration)


def _view(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError, load_config
    from runtime.ipc.logs import setup_logging
    from runtime.observe.live_view import serve_view

    setup_logging()
    config, site = cliopts.files(args)
    try:  # joint names for the schemas, as the recorder has them
        joints: list[str] | None = list(load_config(config, site).robot.joints)
    except ConfigError:
        joints = None
    return serve_view(cliopts.run_dir(args), args.host, args.port, args.frame_hz,
                      args.duration, joints)


# ---------------------------------------------------------------------- doctor
def _doctor(args: argparse.Namespace) -> int:
    from runtime.deploy.doctor import diagnose, report

    config, site = cliopts.files(args)
    checks = diagnose(config, site, cliopts.run_dir(args))
    text, rc = report(checks)
    emit(args, text, {"ok": rc == 0, "checks": [c.__dict__ for c in checks]})
    return rc


# ---------------------------------------------------------------------- record
def _record(args: argparse.Namespace) -> int:
    if args.record_cmd == "serve":
        return _record_serve(args)
    if args.record_cmd == "info":
        return _record_info(args)
    from runtime.ipc import endpoints
    from runtime.ipc.rpc import ControlError, request_at

    run_dir = cliopts.run_dir(args)
    body: dict[str, Any] = {}
    if args.record_cmd == "start":
        body = {"name": args.name}
    elif args.record_cmd == "stop" and args.outcome is not None:
        body = {"success": args.outcome == "success"}
    try:
        reply = request_at(endpoints.recorder(run_dir), args.record_cmd, body, timeout_s=3.0)
    except ControlError:
        return fail("duet record", f"no recorder answering in {run_dir}: sudo systemctl start "
                    "duet-recorder (or `duet run --record`, or `duet record serve`)")
    if not reply["ok"]:
        return fail("duet record", reply["error"])
    result = reply["result"]
    emit(args, _record_text(args.record_cmd, result), result)
    return 0


def _record_text(cmd: str, r: dict[str, Any]) -> str:
    if cmd == "start":
        return f"recording episode to {r.get('path')}; end it with: duet record stop " \
               "[--success|--fail]"
    if cmd == "stop":
        return (f"episode saved: {r.get('path')} ({r.get('messages')} messages, "
                f"{(r.get('bytes') or 0) / 1e6:.1f} MB, outcome {r.get('outcome')})")
    rej = r.get("rejected") or {}
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(rej.items())) if rej else "none"
    return "\n".join([
        f"dir        {r.get('dir')}  ({(r.get('free_mb') or 0):.0f} MB free, budget "
        f"{r.get('budget_mb')} MB)",
        f"episode    {r.get('episode') or '-'}",
        f"incident   {r.get('incident') or '-'}  ({r.get('incidents')} so far)",
        f"received   {r.get('received')}  rejected: {rejected}",
        f"deleted    {r.get('deleted_files')} files for the budget; write errors "
        f"{r.get('write_errors')}"])


def _record_info(args: argparse.Namespace) -> int:
    from runtime.observe.mcap_sink import summarize_recording

    try:
        info = summarize_recording(Path(args.file))
    except OSError as exc:
        return fail("duet record info", exc)
    lines = [f"{name}.{k}: {v}" for name, rec in info["metadata"].items()
             for k, v in rec.items()]
    lines += [f"{t['topic']:<22} {t['schema']:<26} {t['messages']:>8}" for t in info["topics"]]
    lines.append(f"{info['messages']} messages over {info['duration_s']:.1f} s "
                 f"({info['start']} .. {info['end']}), {info['state']}")
    emit(args, "\n".join(lines), info)
    return 0


def _record_serve(args: argparse.Namespace) -> int:
    from runtime.ipc.logs import setup_logging
    from runtime.observe.recorder import serve

    setup_logging()
    cfg = cliopts.load(args, "duet record serve")
    config, _ = cliopts.files(args)
    return serve(cfg, str(config), Path(args.dir or cfg.recorder.dir),
                 continuous=args.continuous, frame_hz=args.frame_hz, duration_s=args.duration)


# ---------------------------------------------------------------------- parser
def _shared(config: bool = True, run_dir: bool = False, store: bool = False,
            overrides: bool = False) -> argparse.ArgumentParser:
    """Options every subcommand of a group takes, accepted after the subcommand."""
    p = argparse.ArgumentParser(add_help=False)
    if config:
        cliopts.add_config(p, overrides=overrides)
    if run_dir:
        cliopts.add_run_dir(p)
    if store:
        p.add_argument("--store", type=Path, default=Layout().bundles,
                       help="bundle store folder (default: %(default)s)")
    cliopts.add_json(p)
    return p


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sc = cliopts.subcommand
    p = sc(sub, "install", "install duet on this robot (or stage it into --root)",
           "sudo duet install --config configs/myrobot.yaml --bundle bundles/reference "
           "--usb-serial FT7WXYZ1\nduet install --root /tmp/stage --no-venv --config "
           "configs/myrobot.yaml\nsudo duet install --offline duet-aarch64-cp310.tar.gz "
           "--sha256 HEX   # from duet pack, no network",
           description="Install duet as one transaction: the venv, units and drop-ins, the "
           "duet user, udev rules, config, bundle and /usr/local/bin/duet; then (on /) "
           "sysusers, tmpfiles, udev reload, daemon-reload, enable. Any failing step is "
           "reported in one line with its fix and every file is restored: rerun once fixed. "
           "On a Jetson (/etc/nv_tegra_release) the venv sees the system site-packages and "
           "gets no PyPI onnxruntime, so NVIDIA's onnxruntime-gpu and TensorRT are used.")
    p.add_argument("--root", default="/", help="stage into this tree instead of /")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the virtualenv goes")
    p.add_argument("--config", type=Path, default=None,
                   help="the robot's config, installed as /etc/duet/duet.yaml (not a sim one); "
                   "with --offline: the archive's unless given")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder to install "
                   "(with --offline: the archive's unless given)")
    p.add_argument("--offline", type=Path, default=None, metavar="ARCHIVE",
                   help="install from a `duet pack` archive with no network: its hashes are "
                   "verified first, pip uses its wheels alone")
    p.add_argument("--sha256", default=None, metavar="HEX", help="with --offline: refuse the "
                   "archive unless its sha256 is this (the one duet pack printed)")
    p.add_argument("--usb-serial", default=None,
                   help="USB serial number of the bus adapter (stable udev match)")
    p.add_argument("--no-venv", action="store_true", help="skip creating the virtualenv")
    p.add_argument("--source", type=Path, default=None,
                   help="duet source tree (default: this checkout, or the working directory)")
    p.add_argument("--no-udev-reload", dest="udev_reload", action="store_false",
                   help="write the udev rules but do not reload udev (no udevd: a container)")
    cliopts.add_json(p)
    p.set_defaults(func=_install)

    p = sc(sub, "pack", "one archive for an install without network: wheels for the "
           "robot's platform, duet, the bundle, units, config",
           "duet pack --platform aarch64 --python 3.10 --config configs/myrobot.yaml --bundle "
           "bundles/reference --out duet-orin.tar.gz\n"
           "# then on the robot: sudo duet install --offline duet-orin.tar.gz --sha256 HEX",
           description="On a workstation with network: build duet's wheel, download a wheel of "
           "every robot dependency for the target (pip download --only-binary=:all: with its "
           "manylinux platforms, CPython version and implementation), and put them with the "
           "bundle, the unit files and the config into one tar.gz whose manifest.json lists "
           "the sha256 of every file. `duet install --offline` installs it with no network. "
           "On a Jetson the wheelhouse's onnxruntime is left out of the venv (NVIDIA's is "
           "kept).")
    p.add_argument("--platform", default="aarch64", help="the robot's machine: aarch64 (Jetson, "
                   "default) or x86_64")
    p.add_argument("--python", default="3.10", help="the robot's CPython (JetPack 6: 3.10, the "
                   "default)")
    p.add_argument("--glibc", default="2.35", help="the robot's glibc: wheels up to this "
                   "manylinux (JetPack 6 / Ubuntu 22.04: 2.35, the default)")
    p.add_argument("--config", type=Path, required=True, help="the robot's config (not a sim "
                   "one); validated here")
    p.add_argument("--bundle", type=Path, default=None, help="bundle folder (verified here)")
    p.add_argument("--out", type=Path, default=None,
                   help="archive path (default: duet-PLATFORM-cpXY.tar.gz here)")
    p.add_argument("--source", type=Path, default=None,
                   help="duet source tree (default: this checkout, or the working directory)")
    cliopts.add_json(p)
    p.set_defaults(func=_pack)

    p = sc(sub, "uninstall", "stop and remove duet (keeps /etc/duet and recordings unless "
           "--purge)", "sudo duet uninstall\nsudo duet uninstall --purge")
    p.add_argument("--root", default="/", help="the tree duet was installed into")
    p.add_argument("--prefix", default=DEFAULT_PREFIX, help="where the virtualenv is")
    p.add_argument("--purge", action="store_true",
                   help="also remove /etc/duet and /var/lib/duet (recordings, change log)")
    cliopts.add_json(p)
    p.set_defaults(func=_uninstall)

    shared = _shared(store=True)
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
    for ep in entry_points(group="duet.bundle_commands"):  # e.g. `create`, with export
        try:
            ep.load()(bsub)
        except ModuleNotFoundError:
            pass  # that feature is not installed here
    p.set_defaults(func=_bundle)

    shared = _shared(run_dir=True)
    p = sc(sub, "config", "validate, show, set, diff the robot config",
           "duet config set follower.blend_ms=60")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="CMD")
    s = sc(csub, "validate", "every start-time check: schema, bus budget, bundle contract, "
           "devices (exit 2 invalid, 1 a check failed)", "duet config validate\n"
           "duet config validate configs/myrobot.yaml --set follower.hz=1000",
           parents=[_shared(overrides=True)])
    s.add_argument("file", nargs="?", type=Path, default=None,
                   help="check this file alone (default: --config + --site)")
    sc(csub, "show", "the config files, or --effective (merged, with defaults)",
       "duet config show --effective", parents=[shared]).add_argument(
        "--effective", action="store_true", help="merged and validated, with defaults")
    s = sc(csub, "set", "KEY=VALUE into the site file: validated, locked, atomic "
           "(+ .bak), logged, live when tunable", "sudo duet config set follower.blend_ms=60",
           parents=[shared])
    s.add_argument("item", metavar="KEY=VALUE")
    s.add_argument("--log", type=Path, default=None, help="change log (default: "
                   "/var/lib/duet/config-changes.log of the install, else beside the site file)")
    s.add_argument("--timeout", type=float, default=2.0, help="live-apply timeout, s")
    sc(csub, "diff", "what the site file changes vs the shipped config", "duet config diff",
       parents=[shared])
    p.set_defaults(func=_config)

    p = sc(sub, "status", "one telemetry sample of follower and planner; exit 1 unless "
           "healthy", "duet status --json")
    cliopts.add_run_dir(p)
    cliopts.add_json(p)
    p.add_argument("--timeout", type=float, default=1.5, help="seconds to wait for a sample")
    p.set_defaults(func=_status)

    p = sc(sub, "top", "live follower/planner view for an SSH terminal (q quits)",
           "duet top --run-dir runs/demo")
    cliopts.add_run_dir(p)
    p.add_argument("--refresh-hz", type=float, default=4.0)
    p.add_argument("--duration", type=float, default=None, help="quit after this many seconds")
    p.set_defaults(func=_top)

    p = sc(sub, "view", "live view in Foxglove: a WebSocket server on 127.0.0.1 with the "
           "recorder's channels", "duet view   # then on your laptop: ssh -L 8765:localhost:"
           "8765 robot, and open ws://localhost:8765 in Foxglove")
    cliopts.add_config(p, overrides=False)
    cliopts.add_run_dir(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: localhost "
                   "only; reach it over an SSH tunnel)")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--frame-hz", type=float, default=5.0, help="camera frames sent per second")
    p.add_argument("--duration", type=float, default=None)
    p.set_defaults(func=_view)

    p = sc(sub, "doctor", "is this machine ready? devices, services, latched faults, CPU, "
           "cameras, real-time, clock, bundle, engine, disk", "duet doctor --json")
    cliopts.add_config(p, overrides=False)
    cliopts.add_run_dir(p)
    cliopts.add_json(p)
    p.set_defaults(func=_doctor)

    shared = _shared(config=False, run_dir=True)
    p = sc(sub, "record", "flight recorder: serve, start NAME, stop, status, info FILE",
           "duet record start pick-red-017 && duet record stop --success")
    rsub = p.add_subparsers(dest="record_cmd", required=True, metavar="CMD")
    s = sc(rsub, "serve", "the recorder process (duet-recorder.service)",
           "duet record serve --config /etc/duet/duet.yaml",
           parents=[_shared(run_dir=True, overrides=True)])
    s.add_argument("--dir", default=None, help="recordings folder (default: recorder.dir)")
    s.add_argument("--continuous", action="store_true", help="also record everything, rotated")
    s.add_argument("--frame-hz", type=float, default=2.0, help="camera frames kept per second")
    s.add_argument("--duration", type=float, default=None)
    sc(rsub, "start", "start the named episode", "duet record start pick-red-017",
       parents=[shared]).add_argument("name")
    s = sc(rsub, "stop", "stop the episode, with the operator's outcome",
           "duet record stop --success", parents=[shared])
    g = s.add_mutually_exclusive_group()
    g.add_argument("--success", dest="outcome", action="store_const", const="success")
    g.add_argument("--fail", dest="outcome", action="store_const", const="fail")
    sc(rsub, "status", "what the recorder is doing", "duet record status", parents=[shared])
    sc(rsub, "info", "metadata, channels and message counts of a recording (also a cut-off "
       "one)", "duet record info /var/lib/duet/recordings/episodes/pick-red-017.mcap",
       parents=[_shared(config=False)]).add_argument("file")
    p.set_defaults(func=_record)
