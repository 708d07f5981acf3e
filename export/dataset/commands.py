"""CLI: `duet dataset export RECORDINGS... --out DIR --format lerobot` (a workstation command:
pyarrow and PyAV are imported in the handler, the `dataset` extra)."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from runtime.commands import options as cliopts


def register(subparsers: Any) -> None:
    p = cliopts.subcommand(subparsers, "dataset", "recordings -> training datasets",
                           "duet dataset export recordings/episodes --out runs/ds "
                           "--format lerobot --outcome success")
    sub = p.add_subparsers(dest="dataset_cmd", required=True, metavar="CMD")
    e = cliopts.subcommand(sub, "export", "MCAP episodes -> a LeRobotDataset v3.0 folder",
                           "duet dataset export /var/lib/duet/recordings/episodes --out "
                           "runs/ds --format lerobot --fps 10 --outcome success")
    e.add_argument("recordings", nargs="+", type=Path,
                   help="MCAP files or folders (searched recursively)")
    e.add_argument("--out", type=Path, required=True, help="dataset folder (replaced if one)")
    e.add_argument("--format", choices=["lerobot"], default="lerobot")
    e.add_argument("--fps", type=int, default=10, help="frames per second (default 10)")
    e.add_argument("--episodes", nargs="+", metavar="NAME", help="only these episodes")
    e.add_argument("--outcome", choices=["success", "fail", "any"], default="any")
    e.add_argument("--since", type=_date, help="only episodes started at or after this "
                   "ISO date/time (UTC unless it says otherwise)")
    e.add_argument("--include-incidents", action="store_true",
                   help="also export incident files and episodes with FAULT/ESTOP")
    e.add_argument("--robot-type", default=None, help="info.json robot_type "
                   "(default: the recordings' robot name)")
    cliopts.add_json(e)
    e.set_defaults(func=_export)


def _date(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date/time: {text!r}") from None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def _export(args: argparse.Namespace) -> int:
    from export.dataset import lerobot
    from export.dataset.select import select
    from runtime.observe.recordings import RecordingError, resample

    if args.fps <= 0:
        return cliopts.fail("duet dataset export", f"--fps must be positive, got {args.fps}",
                            cliopts.EXIT_USAGE)
    quiet = args.json

    def log(text: str) -> None:
        if not quiet:
            print(text)

    try:
        chosen = select(args.recordings, args.episodes, args.outcome, args.since,
                        args.include_incidents)
    except FileNotFoundError as exc:
        return cliopts.fail("duet dataset export", exc, cliopts.EXIT_USAGE)
    frames, skipped = [], list(chosen.skipped)
    for rec in chosen.kept:
        try:
            frames.append(resample(rec, args.fps))
        except RecordingError as exc:
            skipped.append((rec.path, str(exc)))
    for path, why in skipped:
        if not why.startswith("filtered:"):
            print(f"duet dataset export: skipped {path}: {why}", file=sys.stderr)
        else:
            log(f"  not exported: {path.name}: {why.removeprefix('filtered: ')}")
    if not frames:
        return cliopts.fail("duet dataset export", "no episode to export")
    robot = args.robot_type or frames[0].recording.metadata.get("robot") or None
    try:
        info = lerobot.replace_folder(
            args.out, lambda tmp: lerobot.write(frames, tmp, args.fps, robot, log=log))
    except ValueError as exc:
        return cliopts.fail("duet dataset export", exc, cliopts.EXIT_USAGE)
    summary = {"out": str(args.out), "episodes": info["total_episodes"],
               "frames": info["total_frames"], "tasks": info["total_tasks"], "fps": args.fps,
               "skipped": [{"file": str(p), "reason": why} for p, why in skipped]}
    bad = [s for s in summary["skipped"] if not s["reason"].startswith("filtered:")]
    if quiet:
        print(json.dumps(summary))
    else:
        print(f"wrote {args.out}: {info['total_episodes']} episodes, {info['total_frames']} "
              f"frames at {args.fps} fps, {info['total_tasks']} tasks; "
              f"{len(bad)} unreadable file(s) skipped")
    return 0
