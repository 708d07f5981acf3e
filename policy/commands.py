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
    p.add_argument("--steps", type=int, default=None,
                   help="planner optimiser steps (default 2500; 300 with --dataset)")
    p.add_argument("--follower-steps", type=int, default=3000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 2 on an idle machine, else 1)")
    p.add_argument("--smoke", action="store_true",
                   help="a few episodes and steps: checks the pipeline in seconds")
    p.add_argument("--dataset", type=Path, default=None,
                   help="fine-tune on this LeRobotDataset v3.0 (`duet dataset export`) "
                   "instead of training from scratch; needs --init")
    p.add_argument("--init", type=Path, default=None,
                   help="checkpoint folder to fine-tune (what `duet train` wrote)")
    p.add_argument("--sim-fraction", type=float, default=0.5,
                   help="share of each fine-tuning batch drawn from the sim data (default 0.5)")
    p.set_defaults(func=_train)

    e = cliopts.subcommand(subparsers, "eval", "closed-loop evaluation of bundles in the sim",
                           "duet eval --bundle runs/bundles/fp32 --bundle runs/bundles/int8 "
                           "--episodes 100")
    e.add_argument("--bundle", type=Path, required=True, action="append",
                   help="bundle folder; repeat for several precisions (fp32/fp16/int8)")
    e.add_argument("--episodes", type=int, default=100)
    e.add_argument("--ablation-episodes", type=int, default=None,
                   help="episodes for residual-off and chunk-strategy runs (default: --episodes;"
                   " 0: none)")
    e.add_argument("--phrasing", choices=["then", "after"], default="then",
                   help="two-target instructions: 'touch A, then B' or 'touch B after A'")
    e.add_argument("--checkpoints", type=Path, default=None,
                   help="checkpoint folder for the PyTorch eager latency column")
    e.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    e.add_argument("--seed", type=int, default=0, help="first evaluation episode seed offset")
    e.add_argument("--json", type=Path, default=None)
    e.add_argument("--out", type=Path, default=Path("runs/eval"))
    e.set_defaults(func=_eval)


def _train(args: argparse.Namespace) -> int:
    from policy.train import default_threads, train_all

    if (args.dataset is None) != (args.init is None):
        raise SystemExit("duet train: --dataset and --init go together (fine-tuning)")
    if args.dataset is not None:
        return _finetune(args)
    episodes, fsteps = args.episodes, args.follower_steps
    steps = 2500 if args.steps is None else args.steps
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


def _finetune(args: argparse.Namespace) -> int:
    from policy.data import load_or_generate
    from policy.finetune import finetune
    from policy.lerobot_data import DatasetError
    from policy.rollout import LoopSettings
    from policy.train import default_threads
    from runtime.config import load_config

    steps = 300 if args.steps is None else args.steps
    episodes = min(args.episodes, 4) if args.smoke else args.episodes
    if args.smoke:
        steps = min(steps, 5)
    if steps <= 0 or episodes <= 0:
        raise SystemExit("duet train: --steps and --episodes must be positive")
    cfg = load_config(args.config)
    two_step = cfg.sim.two_step_fraction if cfg.sim else 0.5
    sim, _, _ = load_or_generate(args.data_dir, episodes, args.seed,
                                 LoopSettings.from_config(cfg), two_step)
    try:
        finetune(args.init, args.dataset, args.out, sim, steps, args.seed,
                 args.threads or default_threads(), args.sim_fraction,
                 batch=8 if args.smoke else 32)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"duet train: {exc}") from None
    return 0


def _eval(args: argparse.Namespace) -> int:
    from policy.eval import run_eval

    ablation = args.episodes if args.ablation_episodes is None else args.ablation_episodes
    return run_eval(args.bundle, args.episodes, ablation, args.config, args.seed, args.json,
                    args.out, args.checkpoints, phrasing=args.phrasing)
