"""`duet identify`: excite the robot's joints, record them, fit the servo model
(runtime/stack/identify.py, runtime/follower/identification.py)."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from runtime.commands import options as cliopts
from runtime.ipc.logs import setup_logging


def _confirm(phase: Any) -> bool:
    if not sys.stdin.isatty():
        print(f"duet identify: not asking for the {phase.name} phase without a terminal; "
              "pass --yes to run it", file=sys.stderr)
        return False
    answer = input(f"Run the {phase.name} phase ({phase.speed:.0%} of the velocity limits, "
                   f"±{phase.span:.2f} rad)? Keep the e-stop at hand. [y/N] ")
    return answer.strip().lower() in ("y", "yes")


def _identify(args: argparse.Namespace) -> int:
    from runtime.stack.identify import identify, phases
    from runtime.stack.recording import RecordingError

    setup_logging()
    cfg = cliopts.load(args, "duet identify")
    out: Path = args.out
    plan = phases(args.span, args.speed, args.sweep_s, args.poses)
    if args.slow_only:
        plan = plan[:1]
    log_line = (lambda _: None) if args.json else print
    try:
        results = identify(cfg, out, plan, args.seed,
                           confirm=(lambda _: True) if args.yes else _confirm, log_line=log_line)
    except RecordingError as exc:
        return cliopts.fail("duet identify", exc)
    from runtime.follower.identification import fit
    from runtime.observe.recordings import read_tracks

    paths = [Path(r["path"]) for r in results]
    tick_s = 1.0 / cfg.follower.hz
    tracks, used = read_tracks(paths, list(cfg.robot.joints), tick_s)
    try:
        model = fit(tracks, list(cfg.robot.joints), tick_s, used)
    except ValueError as exc:
        return cliopts.fail("duet identify", f"no servo model fitted: {exc}")
    model.save(out / "servo_model.json")
    rows = model.table()
    human = "\n".join(
        [f"servo model ({model.samples} ticks from {len(paths)} recordings) -> "
         f"{out / 'servo_model.json'}",
         f"  {'joint':<14}{'delay ms':>9}{'bw Hz':>7}{'lag ms':>8}{'coul mrad':>10}"
         f"{'sag mrad':>9}{'R2':>7}{'rms mrad':>9}"]
        + [f"  {r['joint']:<14}{r['delay_ms']:>9}{r['bandwidth_hz']:>7}{r['lag_ms']:>8}"
           f"{r['coulomb_mrad']:>10}{r['sag_mrad']:>9}{r['r2']:>7}{r['rms_mrad']:>9}"
           for r in rows]
        + ["next, on a workstation with the recordings: duet train-follower --recordings "
           f"{out}/episodes --config {cliopts.files(args)[0]} --bundle BUNDLE --out OUT"])
    cliopts.emit(args, human, {"recordings": [str(p) for p in paths],
                               "servo_model": asdict(model),
                               "table": rows})
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = cliopts.subcommand(
        sub, "identify", "drive the joints through excitation trajectories, record them, fit "
        "the servo model a follower needs",
        "duet identify --config configs/sim.yaml --out runs/identify --yes",
        description="Start the stack without its planner and with the follower's residual off, "
        "send excitation plans (sweeps and poses inside the limits and --span around where the "
        "arm is, under --speed of the velocity limits): a slow phase, then, once confirmed, "
        "the full one; each is recorded (OUT/episodes/identify-*.mcap). Then fit per joint the "
        "delay, gain, friction and gravity terms (OUT/servo_model.json) that `duet "
        "train-follower` builds followers from. `duet estop` works throughout; an e-stop or a "
        "fault ends the session (exit 1), keeping the recordings.")
    cliopts.add_config(p)
    cliopts.add_run_dir(p)
    p.add_argument("--out", type=Path, default=Path("runs/identify"))
    p.add_argument("--span", type=float, default=0.6, help="rad around the start pose (0.6)")
    p.add_argument("--speed", type=float, default=0.5,
                   help="fraction of each joint's velocity limit in the full phase (0.5)")
    p.add_argument("--sweep-s", type=float, default=40.0, help="sweep seconds, full phase (40)")
    p.add_argument("--poses", type=int, default=12, help="rest poses, full phase (12)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--yes", action="store_true", help="run the full phase without asking")
    p.add_argument("--slow-only", action="store_true", help="only the slow phase")
    cliopts.add_json(p)
    p.set_defaults(func=_identify)
