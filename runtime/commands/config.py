"""`duet config validate | show | set | diff`: the robot config over SSH, journalled."""

from __future__ import annotations

import argparse
import errno
import json
from pathlib import Path
from typing import Any

from runtime.commands import options as cliopts
from runtime.commands.options import EXIT_FAILED, EXIT_USAGE, emit, fail
from runtime.deploy.layout import Layout


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
                shown = [p for p in (config, site) if p is not None and p.exists()]
                if not shown:
                    return fail("duet config show", f"no config at {config}: pass --config "
                                "FILE (or set DUET_CONFIG)", EXIT_USAGE)
                for path in shown:
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
    except BrokenPipeError:
        raise  # the reader closed our stdout (`| head`): runtime/cli.py ends quietly
    except OSError as exc:  # e.g. a root-owned site file
        hint = " (run it with sudo)" if exc.errno in (errno.EACCES, errno.EPERM) else ""
        return fail(f"duet config {args.config_cmd}",
                    f"{exc.filename or ''}: {exc.strerror}{hint}".lstrip(": "))


def _validate(args: argparse.Namespace, config: Path, site: Path | None) -> int:
    """Every start-time check: schema and bus budget (exit 2), then bundle contract, the
    planner's latency against the timing, and devices (exit 1). `nginx -t` for duet."""
    from runtime.config import load_config
    from runtime.deploy.preflight import problems, timing_findings

    if args.file is not None:
        config, site = args.file, None
    files = [f for f in (config, site) if f is not None and (f is config or f.exists())]
    cfg = load_config(config, files[1] if len(files) > 1 else None, args.set)
    found = problems(cfg)
    timing, lat = timing_findings(cfg, args.bench)
    found += [why for level, why in timing if level == "fail" and why not in found]
    warnings = [why for level, why in timing if level == "warn"]
    names = " + ".join(str(f) for f in files)
    lines = [f"FAIL {p}" for p in found] + [f"WARN {w}" for w in warnings]
    if lat is not None:
        lines.append(f"planner latency {lat}")
    lines.append(f"{'invalid' if found else 'ok'}: {names}" + (
        f" ({len(found)} problems)" if found else ""))
    emit(args, "\n".join(lines),
         {"ok": not found, "files": [str(f) for f in files], "problems": found,
          "warnings": warnings, "latency_ms": None if lat is None else
          {"p50": round(lat.p50_ms, 2), "p99": round(lat.p99_ms, 2)}})
    return EXIT_FAILED if found else 0


def _config_set(args: argparse.Namespace, ce: Any, config: Path, site: Path) -> int:
    from runtime.deploy.install import rerender
    from runtime.deploy.journal import Journal, atomic_write, remove_stale_temps
    from runtime.deploy.layout import change_log, installed_root
    from runtime.deploy.steps import StepFailed, external, run_checked
    from runtime.ipc import endpoints
    from runtime.ipc.rpc import ControlError, request_at

    log = args.log or change_log(site)
    out: dict[str, Any] = {}
    lines: list[str] = []
    rc = 0
    with ce.locked(site):  # read, validate, write, log: one critical section
        for stale in remove_stale_temps(site.parent):  # a killed `config set` left it
            lines.append(f"removed {stale} (left by an interrupted write)")
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
                    lines += [f"follower refused it live: {reply['error']}",
                              ce.restart_hint(key, root)]
                    rc = EXIT_FAILED
        else:
            applied = "restart"
            lines.append(ce.restart_hint(key, root))
        ce.log_change(log, key, old, new, applied)
    emit(args, "\n".join(lines), {**out, "applied": applied, "site": str(site),
                                  "rendered": [str(p) for p in rendered], "log": str(log)})
    return rc


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sc = cliopts.subcommand
    shared = cliopts.shared(run_dir=True)
    p = sc(sub, "config", "validate, show, set, diff the robot config",
           "duet config set follower.blend_ms=60")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="CMD")
    s = sc(csub, "validate", "every start-time check: schema, bus budget, bundle contract, "
           "devices (exit 2 invalid, 1 a check failed)", "duet config validate\n"
           "duet config validate configs/myrobot.yaml --set follower.hz=1000\n"
           "duet config validate --bench 20",
           parents=[cliopts.shared(overrides=True)])
    s.add_argument("file", nargs="?", type=Path, default=None,
                   help="check this file alone (default: --config + --site)")
    s.add_argument("--bench", type=int, default=0, metavar="N",
                   help="also run the planner N times here and check its latency against "
                   "horizon x dt_s, follower.plan_timeout_ms and planner.hz")
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
