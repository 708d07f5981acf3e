"""`duet train` and `duet eval` (torch and mujoco are imported inside the handlers)."""

from __future__ import annotations

import argparse
from pathlib import Path

from runtime import cliopts

DEFAULT_CONFIG = "configs/sim.yaml"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cliopts.subcommand(subparsers, "train", "generate sim data and train planner + follower",
                           "duet train --out runs/ck4   # ~15 min on 2 cores, fixed seeds")
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    p.add_argument("--episodes", type=int, default=200,
                   help="expert rollout episodes (follower data and planner scenes)")
    p.add_argument("--scenes", type=int, default=6000,
                   help="kinematic walks rendered for planner scenes (3 images each)")
    p.add_argument("--walks", type=int, default=20000,
                   help="kinematic walks for image-free planner action samples")
    p.add_argument("--workers", type=int, default=2, help="processes for data generation")
    p.add_argument("--steps", type=int, default=2500, help="planner optimiser steps")
    p.add_argument("--follower-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 on an idle machine, else 1)")
    p.add_argument("--smoke", action="store_true",
                   help="a few episodes and steps: checks the pipeline in seconds")
    p.set_defaults(func=_train)

    e = cliopts.subcommand(subparsers, "eval", "closed-loop evaluation of bundles in the sim",
                           "duet eval --bundle runs/bundles/fp32 --bundle runs/bundles/int8 "
                           "--episodes 100")
    e.add_argument("--bundle", type=Path, required=True, action="append",
                   help="bundle folder; repeat for several precisions (fp32/fp16/int8)")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--ablation-episodes", type=int, default=None,
                   help="episodes for residual-off and chunk-strategy runs (default: --episodes)")
    e.add_argument("--checkpoints", type=Path, default=None,
                   help="checkpoint folder for the PyTorch eager latency column")
    e.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    e.add_argument("--seed", type=int, default=0, help="first evaluation episode seed offset")
    e.add_argument("--json", type=Path, default=None)
    e.add_argument("--out", type=Path, default=Path("runs/eval"))
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from policy.train import default_threads, train_all

    episodes, steps, fsteps = args.episodes, args.steps, args.follower_steps
    scenes, walks, workers = args.scenes, args.walks, args.workers
    if args.smoke:
        episodes, steps, fsteps = min(episodes, 4), min(steps, 20), min(fsteps, 50)
        scenes, walks, workers = min(scenes, 10), min(walks, 20), 1
    for name, value in (("--episodes", episodes), ("--steps", steps),
                        ("--follower-steps", fsteps), ("--scenes", scenes), ("--walks", walks),
                        ("--workers", workers)):
        if value <= 0:
            raise SystemExit(f"duet train: {name} must be positive")
    train_all(args.out, episodes, steps, fsteps, args.seed, args.data_dir,
              args.threads or default_threads(), args.config, scenes=scenes, walks=walks,
              workers=workers)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from policy.eval import run_eval

    return run_eval(args.bundle, args.episodes, args.ablation_episodes or args.episodes,
                    args.config, args.seed, args.json, args.out, args.checkpoints)
