"""`duet sim`: run the simulated robot (MuJoCo arm behind emulated motors)."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime.commands import options as cliopts


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = cliopts.subcommand(subparsers, "sim", "run the simulated robot (prints its device "
                           "first)", "duet sim --config configs/sim.yaml --run-dir runs/sim")
    cliopts.add_config(p)
    cliopts.add_run_dir(p)
    p.set_defaults(func=_run)
    register_teleop(subparsers)


def _run(args: argparse.Namespace) -> int:
    cfg = cliopts.load(args, "duet sim")
    from runtime.config import ConfigError
    from sim.server import run_sim

    try:
        return run_sim(cfg)
    except ConfigError as exc:
        return cliopts.fail("duet sim", exc, cliopts.EXIT_USAGE)


def register_teleop(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = cliopts.subcommand(subparsers, "teleop", "record sim episodes teleoperated by the "
                           "scripted expert (demonstrations)",
                           "duet teleop --config configs/sim.yaml --set sim.phrasing=after "
                           "--episodes 20 --out runs/rec --run-dir runs/teleop")
    cliopts.add_config(p)
    cliopts.add_run_dir(p)
    p.add_argument("--episodes", type=int, default=20, help="episodes to record")
    p.add_argument("--out", type=Path, required=True, help="recordings folder")
    p.add_argument("--prefix", default="teleop", help="episode names: PREFIX-000, ...")
    p.add_argument("--frame-hz", type=float, default=10.0, help="camera frames kept per second")
    cliopts.add_json(p)
    p.set_defaults(func=_teleop)


def _teleop(args: argparse.Namespace) -> int:
    import signal

    from runtime.ipc.logs import setup_logging
    from runtime.stack.recording import RecordingError
    from sim.teleop import collect

    if args.episodes <= 0:
        return cliopts.fail("duet teleop", "--episodes must be positive", cliopts.EXIT_USAGE)
    setup_logging()
    cfg = cliopts.load(args, "duet teleop")

    def _stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # through collect's cleanup: no orphaned stack

    signal.signal(signal.SIGTERM, _stop)
    try:
        results = collect(cfg, args.out, args.episodes, args.prefix, args.frame_hz,
                          log_line=(lambda _: None) if args.json else print)
    except RecordingError as exc:  # the session's and the recorder's
        return cliopts.fail("duet teleop", exc)
    ok = sum(r["outcome"] == "success" for r in results)
    cliopts.emit(args, f"recorded {len(results)} episodes in {args.out}/episodes "
                 f"({ok} successful)", {"episodes": results, "successes": ok})
    return 0
