"""`duet status | top | view | doctor | record`: watching and diagnosing a robot."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from runtime.commands import options as cliopts
from runtime.commands.options import emit, fail


def _status(args: argparse.Namespace) -> int:
    from runtime.observe import status

    return status.run(args, cliopts.run_dir(args))


def _top(args: argparse.Namespace) -> int:
    from runtime.observe.top import run_top

    if args.json:  # a live screen has no JSON: one sample, as `duet status --json` prints it
        return _status(args)

    return run_top(cliopts.run_dir(args), args.refresh_hz, args.duration)


def _view(args: argparse.Namespace) -> int:
    from runtime.config import ConfigError, load_config
    from runtime.ipc.logs import setup_logging
    from runtime.observe.foxglove_ws import FOXGLOVE_APP
    from runtime.observe.live_view import serve_view

    setup_logging()
    config, site = cliopts.files(args)
    try:  # joint names for the schemas, as the recorder has them
        joints: list[str] | None = list(load_config(config, site).robot.joints)
    except ConfigError:
        joints = None
    return serve_view(cliopts.run_dir(args), args.host, args.port, args.frame_hz,
                      args.duration, joints, (FOXGLOVE_APP, *args.allow_origin), args.json)


def _doctor(args: argparse.Namespace) -> int:
    from runtime.deploy.doctor import diagnose, report

    config, site = cliopts.files(args)
    checks = diagnose(config, site, cliopts.run_dir(args))
    text, rc = report(checks)
    emit(args, text, {"ok": rc == 0, "checks": [c.__dict__ for c in checks]})
    return rc


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
        if args.task is not None:  # the robot works on it, and the episode is labelled so
            try:
                reply = request_at(endpoints.task(run_dir), "task", {"instruction": args.task})
            except ControlError as exc:
                return fail("duet record start", f"--task: {exc}")
            if not reply["ok"]:
                return fail("duet record start", f"--task: {reply['error']}")
            body["task"] = args.task
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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sc = cliopts.subcommand
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
    p.add_argument("--json", action="store_true", help="no screen: print one sample as "
                   "`duet status --json` does (same exit code) and quit")
    p.add_argument("--timeout", type=float, default=1.5, help="with --json: seconds to wait "
                   "for the sample")
    p.set_defaults(func=_top)

    p = sc(sub, "view", "live view in Foxglove: a WebSocket server on 127.0.0.1 with the "
           "recorder's channels, for who has the token it prints", "duet view   # then on "
           "your laptop: ssh -L 8765:localhost:8765 robot, and open the printed "
           "ws://localhost:8765/?token=... in Foxglove")
    cliopts.add_config(p, overrides=False)
    cliopts.add_run_dir(p)
    cliopts.add_json(p)
    p.add_argument("--allow-origin", action="append", default=[], metavar="ORIGIN",
                   help="a browser origin allowed besides the Foxglove app's "
                   "(https://app.foxglove.dev), e.g. a self-hosted Foxglove; repeatable")
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

    shared = cliopts.shared(config=False, run_dir=True)
    p = sc(sub, "record", "flight recorder: serve, start NAME, stop, status, info FILE",
           "duet record start pick-red-017 && duet record stop --success")
    rsub = p.add_subparsers(dest="record_cmd", required=True, metavar="CMD")
    s = sc(rsub, "serve", "the recorder process (duet-recorder.service)",
           "duet record serve --config /etc/duet/duet.yaml",
           parents=[cliopts.shared(run_dir=True, overrides=True)])
    s.add_argument("--dir", default=None, help="recordings folder (default: recorder.dir)")
    s.add_argument("--continuous", action="store_true", help="also record everything, rotated")
    s.add_argument("--frame-hz", type=float, default=2.0, help="camera frames kept per second")
    s.add_argument("--duration", type=float, default=None)
    s = sc(rsub, "start", "start the named episode", 'duet record start pick-red-017 --task '
           '"touch the red block"', parents=[shared])
    s.add_argument("name")
    s.add_argument("--task", default=None, metavar="TEXT", help="set the planner's task "
                   "(as `duet task TEXT`) and label the episode with it")
    s = sc(rsub, "stop", "stop the episode, with the operator's outcome",
           "duet record stop --success", parents=[shared])
    g = s.add_mutually_exclusive_group()
    g.add_argument("--success", dest="outcome", action="store_const", const="success")
    g.add_argument("--fail", dest="outcome", action="store_const", const="fail")
    sc(rsub, "status", "what the recorder is doing", "duet record status", parents=[shared])
    sc(rsub, "info", "metadata, channels and message counts of a recording (also a cut-off "
       "one)", "duet record info /var/lib/duet/recordings/episodes/pick-red-017.mcap",
       parents=[cliopts.shared(config=False)]).add_argument("file")
    p.set_defaults(func=_record)
