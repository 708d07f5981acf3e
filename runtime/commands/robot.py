"""`duet run | stop | follower | planner | estop | reset | reboot | task | keys`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from runtime.commands import options as cliopts
from runtime.commands.options import emit as _print
from runtime.ipc.access import caller
from runtime.ipc.logs import setup_logging


def _positive_s(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: expected seconds > 0")
    return value


def _run(args: argparse.Namespace) -> int:
    from runtime.stack.supervisor import run

    setup_logging()
    cfg = cliopts.load(args, "duet run")
    config, _ = cliopts.files(args)
    return run(cfg, str(config), args.duration, args.summary_json, record=args.record,
               ready_timeout_s=args.ready_timeout, as_json=args.json)


def _follower(args: argparse.Namespace) -> int:
    from runtime.follower.process import run_follower

    setup_logging()
    return run_follower(cliopts.load(args, "duet follower"), args.duration,
                        sys.stdin if args.bus_after_stdin else None)


def _planner(args: argparse.Namespace) -> int:
    setup_logging()
    if args.listen:
        from runtime.remote.server import run_server

        args.set.append(f"planner.serve.listen={args.listen}")
        return run_server(cliopts.load(args, "duet planner"), args.duration)
    from runtime.planner.process import run_planner

    cfg = cliopts.load(args, "duet planner")
    if cfg.planner.remote is not None:  # the robot's planner is a relay to a planner server
        from runtime.remote.relay import RelaySource

        return run_planner(cfg, args.duration, RelaySource)
    from runtime.planner.local import PipelineSource
    from runtime.remote.shadow import ShadowFeed

    # the bundle's pipeline, its observations and plans offered to a shadow planner
    return run_planner(cfg, args.duration,
                       lambda c, b: ShadowFeed(PipelineSource(c, b), c, b))


def _keys_generate(args: argparse.Namespace) -> int:
    from runtime.ipc.keys import KeyFileError, generate

    try:
        public, secret = generate(args.name, args.out)
    except (KeyFileError, OSError) as exc:
        print(f"duet keys generate: {exc}", file=sys.stderr)
        return 1
    print(f"public key: {public}  (give it out: a robot's goes into the server's allow-list "
          f"directory, the server's to its robots)\nsecret key: {secret}  (mode 0600; "
          "never leaves this host)")
    return 0


def _estop(args: argparse.Namespace) -> int:
    """The control socket first; if it does not answer, SIGUSR1 to the pid holding the run
    dir's follower lock; only when both fail: NOT STOPPED and a non-zero exit."""
    import os
    import signal
    import time
    from pathlib import Path

    from runtime.ipc import endpoints, rundir
    from runtime.ipc.rpc import ControlError, request_at

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    who = caller()
    try:
        reply = request_at(endpoints.control(run_dir), "estop", {"reason": f"cli ({who})"},
                           timeout_s=1.0)
        if reply["ok"]:
            _print(args, "ESTOP: torque off. Resume with: duet reset",
                   {"stopped": True, "via": "control", **reply["result"]})
            return 0
        why = str(reply["error"])
    except ControlError as exc:
        why = str(exc)
    held, pid = rundir.holder(run_dir, endpoints.FOLLOWER_LOCK)
    if held and pid:
        try:
            os.kill(pid, signal.SIGUSR1)
        except OSError as exc:
            why += f"; SIGUSR1 to pid {pid} failed: {exc.strerror}"
        else:
            latch = Path(run_dir, endpoints.LATCH)
            for _ in range(20):
                time.sleep(0.05)
                try:
                    if latch.read_text().startswith("ESTOP"):
                        _print(args, f"ESTOP by signal to the follower (pid {pid}): torque off."
                               f" The control socket did not answer ({why}). "
                               "Resume with: duet reset",
                               {"stopped": True, "via": "signal", "pid": pid})
                        return 0
                except OSError:
                    pass
            why += f"; SIGUSR1 sent to pid {pid} but the follower did not confirm"
    else:
        why += f"; no follower holds {run_dir}/{endpoints.FOLLOWER_LOCK}"
    print(f"NOT STOPPED: {why}. Use the hardware e-stop.", file=sys.stderr)
    if args.json:
        _print(args, "", {"stopped": False, "why": why})
    return 1


def _reset(args: argparse.Namespace) -> int:
    from runtime.ipc import endpoints
    from runtime.ipc.rpc import ControlError, request_at

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    motors = getattr(args, "motors", None)  # `duet reboot MOTOR...`: clear their errors first
    body = {"reboot": motors} if motors else {}
    name = "duet reboot" if motors else "duet reset"
    try:  # a reset may reboot servos, reopen the bus and re-enable torque: allow it time
        reply = request_at(endpoints.control(run_dir), "reset", body, timeout_s=10.0)
    except ControlError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return 1
    if not reply["ok"]:
        print(f"{name}: {reply['error']}", file=sys.stderr)
        return 1
    result = reply["result"]
    mode, detail = result.get("mode"), result.get("detail")
    _print(args, f"{mode}" if detail in (None, "", mode) else f"{mode}: {detail}", result)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from runtime.deploy.units import enabled_services
    from runtime.ipc import endpoints
    from runtime.stack import stop

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    what, pid, _ = stop.running(run_dir)
    if what == "follower" and enabled_services():  # systemd would only restart it
        return cliopts.fail("duet stop", f"the follower on {run_dir} (pid {pid or '?'}) is "
                            "systemd's: sudo systemctl stop duet.target")
    done = stop.stop(run_dir, args.timeout)
    if not done.done:
        return cliopts.fail("duet stop", done.detail)
    _print(args, done.detail, {"stopped": done.what or None, "pid": done.pid,
                               "run_dir": run_dir})
    return 0


def _task(args: argparse.Namespace) -> int:
    from runtime.ipc import endpoints
    from runtime.ipc.rpc import ControlError, request_at

    run_dir = endpoints.resolve_run_dir(args.run_dir)
    if args.clear:
        body: dict[str, Any] = {"clear": True}
    elif args.instruction:
        body = {"instruction": args.instruction}
        if args.episode is not None:
            body["episode"] = int(args.episode) if args.episode.isdigit() else args.episode
    else:
        body = {}
    try:
        reply = request_at(endpoints.task(run_dir), "task" if body else "status", body)
    except ControlError as exc:
        print(f"duet task: {exc}", file=sys.stderr)
        return 1
    if not reply["ok"]:
        print(f"duet task: {reply['error']}", file=sys.stderr)
        return 2 if "refused" in str(reply["error"]) else 1
    result = reply["result"]
    if not body:
        text = result.get("instruction") or "(no task: idle)"
        _print(args, f"task: {text}  [planner {result.get('status')}]", result)
    elif args.clear:
        _print(args, "task cleared: the sim's episodes drive the planner again"
               if result.get("next") == "sim" else
               "task cleared: the planner stops, the follower holds", result)
    else:
        _print(args, f"task set: {result['task']['instruction']}", result)
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = cliopts.subcommand(
        sub, "run", "run sim (if configured), follower, planner (and the recorder when "
        "recorder.enabled); summarise at the end",
        "duet run --config configs/sim.yaml --duration 20 --summary-json runs/summary.json",
        description="Start the sim (when the config has a sim: section), the follower, the "
        "planner and, with recorder.enabled, the flight recorder; supervise them like systemd "
        "does; on Ctrl-C/SIGTERM stop them in order and print the summary. Exit 1 when the "
        "follower ended in FAULT/ESTOP, 2 for an invalid config.")
    cliopts.add_config(p)
    cliopts.add_run_dir(p)
    p.add_argument("--duration", type=float, default=None, help="seconds, default: until Ctrl-C")
    p.add_argument("--summary-json", default=None, help="write the summary JSON here")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object "
                   "instead of the table (stdout has nothing else: the processes' output "
                   "goes to stderr)")
    p.add_argument("--record", action=argparse.BooleanOptionalAction, default=None,
                   help="start the recorder (default: recorder.enabled)")
    p.add_argument("--ready-timeout", type=_positive_s, default=None, metavar="S",
                   help="seconds for the sim to offer its device and the follower to be ready"
                        " (default 30; raise it on slow or emulated machines)")
    p.set_defaults(func=_run)

    for name, func, text in (("follower", _follower, "the real-time follower process "
                              "(what duet-follower.service runs)"),
                             ("planner", _planner, "the planner process (what "
                              "duet-planner.service runs)")):
        p = cliopts.subcommand(sub, name, text, f"duet {name} --config /etc/duet/duet.yaml")
        cliopts.add_config(p)
        cliopts.add_run_dir(p)
        p.add_argument("--duration", type=float, default=None)
        if name == "follower":
            p.add_argument("--bus-after-stdin", action="store_true",
                           help="set up, then open the bus after a line on stdin (`duet run` "
                                "starts the follower while its sim comes up)")
        if name == "planner":
            p.add_argument("--listen", default=None, metavar="tcp://HOST:PORT",
                           help="serve robots over the network (CURVE; planner.serve)")
        p.set_defaults(func=func)

    p = cliopts.subcommand(sub, "keys", "CURVE key pairs for the off-board planner",
                           "duet keys generate robot-17 --out /etc/duet/keys")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    g = cliopts.subcommand(keys_sub, "generate", "write NAME.key (public) and NAME.key_secret "
                           "(0600)", "duet keys generate robot-17 --out /etc/duet/keys")
    g.add_argument("name", help="the robot's or the server's name (the allow-list shows it)")
    g.add_argument("--out", default=".", help="directory for the two files (default: .)")
    g.set_defaults(func=_keys_generate)

    for cmd, func, text in (
            ("estop", _estop, "emergency stop: torque off until `duet reset` (falls back to "
             "SIGUSR1 when the control socket is silent; exit 1 only when NOT stopped)"),
            ("reset", _reset, "leave FAULT/ESTOP: re-read the motors, hold what they hold")):
        p = cliopts.subcommand(sub, cmd, text, f"duet {cmd} --run-dir runs/demo")
        cliopts.add_run_dir(p)
        cliopts.add_json(p)
        p.set_defaults(func=func)

    p = cliopts.subcommand(
        sub, "reboot", "clear a motor's latched hardware error (overload, overheating), then "
        "reset", "duet reboot elbow --run-dir runs/demo",
        description="For a FAULT like 'hardware error: elbow (id 3): overload': the follower "
        "clears the named motors' latched error (Dynamixel: the REBOOT instruction; Damiao: the "
        "clear-error frame; CubeMars, MyActuator, generic MIT and Feetech have none over the "
        "wire: it says to power-cycle the motor), then resets as `duet reset` does: re-reads "
        "the motors and holds where they are. Exit 1 when the motor or the reset failed (the "
        "reason is what status shows now).")
    p.add_argument("motors", nargs="+", metavar="MOTOR", help="joint name(s), as status "
                   "names them")
    cliopts.add_run_dir(p)
    cliopts.add_json(p)
    p.set_defaults(func=_reset)

    p = cliopts.subcommand(
        sub, "stop", "stop the `duet run` stack on a run dir (from another shell)",
        "duet stop --run-dir runs/demo",
        description="SIGTERM to the `duet run` holding the run dir: it stops planner, "
        "follower (controlled stop), recorder and sim in order and writes its summary; with "
        "no `duet run`, to an orphaned follower. Waits until the run dir is free. Exit 0 "
        "when stopped or nothing ran, 1 when it could not stop it.")
    cliopts.add_run_dir(p)
    p.add_argument("--timeout", type=_positive_s, default=40.0, metavar="S",
                   help="seconds to wait for the stack to stop (default 40)")
    cliopts.add_json(p)
    p.set_defaults(func=_stop)

    p = cliopts.subcommand(sub, "task", "set, show or clear the planner's instruction",
                           'duet task "touch the red block" --episode 17',
                           description="Set the instruction the planner works on, live; "
                           "without an instruction, show the current one.")
    p.add_argument("instruction", nargs="?", help="the instruction (omit to show the task)")
    p.add_argument("--episode", default=None, help="an episode id to label the task with")
    p.add_argument("--clear", action="store_true", help="no task: stop planning, hold")
    cliopts.add_run_dir(p)
    cliopts.add_json(p)
    p.set_defaults(func=_task)
