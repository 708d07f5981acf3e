"""`duet train`, `duet eval`, `duet train-follower`, `duet follower-table` (torch and mujoco are
imported inside the handlers)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from runtime.commands import options as cliopts

DEFAULT_CONFIG = "configs/sim.yaml"
# The planners' training data (policy.data, cached): rollout episodes, rendered walks, walks.
DATA = {"episodes": 200, "scenes": 6000, "walks": 20000, "workers": 2}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = cliopts.subcommand(subparsers, "train", "generate sim data and train planner + follower",
                           "duet train --out runs/ck4   # ~15 min on 2 cores, fixed seeds")
    p.add_argument("--out", type=Path, default=Path("checkpoints"))
    p.add_argument("--data-dir", type=Path, default=Path("data"))
    p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    p.add_argument("--episodes", type=int, default=DATA["episodes"],
                   help="expert rollout episodes (follower data and planner scenes)")
    p.add_argument("--scenes", type=int, default=DATA["scenes"],
                   help="kinematic walks rendered for planner scenes (3 images each)")
    p.add_argument("--walks", type=int, default=DATA["walks"],
                   help="kinematic walks for image-free planner action samples")
    p.add_argument("--workers", type=int, default=DATA["workers"],
                   help="processes for data generation")
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

    f = cliopts.subcommand(
        subparsers, "train-fact", "train the FACT tokenizer and the FACT planner (same sim data)",
        "duet train-fact --out runs/fact --init-planner runs/ck_ref")
    f.add_argument("--out", type=Path, default=Path("runs/fact"))
    f.add_argument("--data-dir", type=Path, default=Path("data"))
    f.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    f.add_argument("--code-len", type=int, default=20, help="codes per chunk (L)")
    f.add_argument("--code-bits", type=int, default=6, help="bits per code (B)")
    f.add_argument("--tokenizer-steps", type=int, default=3000)
    f.add_argument("--steps", type=int, default=2000, help="planner optimiser steps")
    f.add_argument("--prefix-max", type=int, default=5,
                   help="longest action prefix (waypoints) the planner is trained with")
    f.add_argument("--init-planner", type=Path, default=None,
                   help="reference planner checkpoint (duet train) to start from; its "
                        "perception stays frozen (several times faster)")
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    f.add_argument("--smoke", action="store_true",
                   help="tiny data and a few steps: checks the pipeline in seconds")
    f.set_defaults(func=_train_fact)

    s = cliopts.subcommand(
        subparsers, "fact-study", "reconstruction error vs code length: FACT, uniform binning, DCT",
        "duet fact-study --json runs/fact-study.json")
    s.add_argument("--data-dir", type=Path, default=Path("data"))
    s.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    s.add_argument("--code-lens", type=int, nargs="+", default=[4, 8, 12, 20, 32])
    s.add_argument("--code-bits", type=int, default=6)
    s.add_argument("--quantizer", choices=["gray", "lfq"], default="gray",
                   help="FACT's bitwise quantizer (policy.fact.FactTokenizer)")
    s.add_argument("--steps", type=int, default=3000, help="tokenizer optimiser steps")
    s.add_argument("--decoder-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=2)
    s.add_argument("--json", type=Path, default=None)
    s.set_defaults(func=_fact_study)

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
    fact = e.add_argument_group(
        "FACT planner (issue 13)", "--fact BUNDLE: the first --bundle is the reference; "
        "writes fact-eval.md/png/json (policy/fact_eval.py)")
    fact.add_argument("--fact", type=Path, default=None, help="the FACT bundle")
    fact.add_argument("--flow-steps", type=int, nargs="+", default=[1, 2, 4, 8, 16],
                      help="decoder Euler steps K to compare")
    fact.add_argument("--grid-episodes", type=int, default=20,
                      help="episodes per prefix x strategy x delay cell")
    fact.add_argument("--delays-ms", type=float, nargs="+", default=[0.0, 100.0, 300.0],
                      help="injected planner delays")
    fact.add_argument("--fact-metrics", type=Path, default=None,
                      help="duet train-fact's fact-metrics.json (reconstruction error)")
    fact.add_argument("--decoder-latency", type=Path, default=None,
                      help="bench/fact_decoder.py --json output")
    fact.add_argument("--workers", type=int, default=1, help="processes running cells")
    e.set_defaults(func=_eval)

    t = cliopts.subcommand(
        subparsers, "train-follower", "followers for your robot from its tracking recordings: "
        "none, model-free (identified), learned; a bundle with each",
        "duet train-follower --recordings runs/identify/episodes --config configs/sim.yaml "
        "--bundle bundles/reference --out runs/followers",
        description="Fit the servo model (as `duet identify` does) and a learned correction on "
        "top of it (hindsight: the measured motion is the reference the given command tracks), "
        "export both through the exporter, and write OUT/bundle-none, OUT/bundle-model-free "
        "and OUT/bundle-learned: the --bundle's planner with each follower. Reports what each "
        "leaves on held-out stretches and, on a sim config, tracking RMS on held-out "
        "references (OUT/report.json).")
    t.add_argument("--recordings", type=Path, nargs="+", required=True,
                   help="MCAP files, or folders of them")
    t.add_argument("--bundle", type=Path, required=True, help="the planner bundle to pair with")
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    t.add_argument("--steps", type=int, default=1500, help="correction optimiser steps")
    t.add_argument("--correction-max", type=float, default=0.02,
                   help="rad: bound of the learned correction on the model-free command")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--smoke", action="store_true", help="a few steps, one short evaluation")
    cliopts.add_json(t)
    t.set_defaults(func=_train_follower)

    ft = cliopts.subcommand(
        subparsers, "follower-table", "tracking of each follower under several planners' "
        "chunks, held-out references and holds (planner-agnostic checks)",
        "duet follower-table --followers runs/followers --planner reference=bundles/reference "
        "--planner fact=bundles/fact")
    ft.add_argument("--followers", type=Path, required=True,
                    help="what `duet train-follower` wrote (follower-*.onnx)")
    ft.add_argument("--planner", action="append", default=[], metavar="NAME=BUNDLE",
                    help="a planner bundle whose chunks the followers track (repeatable)")
    ft.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG))
    ft.add_argument("--episodes", type=int, default=6, help="sim episodes per planner")
    ft.add_argument("--seed", type=int, default=0)
    ft.add_argument("--smoke", action="store_true", help="one of each, short")
    cliopts.add_json(ft)
    ft.set_defaults(func=_follower_table)


def _train_follower(args: argparse.Namespace) -> int:
    from policy.train_follower import train
    from runtime.config import load_config
    from runtime.observe.recordings import read_tracks

    cfg = load_config(args.config)
    paths = [p for given in args.recordings
             for p in (sorted(given.rglob("*.mcap")) if given.is_dir() else [given])]
    tracks, used = read_tracks(paths, list(cfg.robot.joints), 1.0 / cfg.follower.hz)
    if not tracks:
        return cliopts.fail("duet train-follower", "no usable recordings in "
                            f"{' '.join(map(str, args.recordings))}")
    log = (lambda _: None) if args.json else print
    report = train(cfg, tracks, used, args.bundle, args.out,
                   steps=20 if args.smoke else args.steps,
                   correction_max=args.correction_max, seed=args.seed,
                   eval_refs=1 if args.smoke else 2, eval_s=4.0 if args.smoke else 12.0,
                   log=log)
    off = report["offline_rms_mrad"]
    lock = report.get("lockstep_rms_mrad", {})
    human = "\n".join(
        [f"followers from {len(used)} recordings ({report['samples']} samples, "
         f"{report['fit_and_train_s']} s) -> {args.out}",
         f"  {'follower':<12}{'held-out mrad':>15}{'tracking mrad':>15}   bundle"]
        + [f"  {k:<12}{off[k]:>15}{lock.get(k, '-'):>15}   {report['bundles'][k]}"
           for k in off]
        + [f"ship {report['bundles'][report['ship']]}: the lowest "
           + ("tracking RMS on held-out references" if lock else "held-out error")])
    cliopts.emit(args, human, report)
    return 0


def _follower_table(args: argparse.Namespace) -> int:
    from policy.follower_eval import format_table, onnx_follower, table
    from runtime.config import load_config
    from runtime.model.bundle import BundleError, load_bundle

    cfg = load_config(args.config)
    planners = {}
    for item in args.planner:
        name, _, path = item.partition("=")
        if not name or not path:
            return cliopts.fail("duet follower-table", f"--planner {item!r}: expected NAME=BUNDLE",
                                cliopts.EXIT_USAGE)
        planners[name] = Path(path)
    for name, path in planners.items():  # before minutes of runs, not after
        try:
            load_bundle(path, expect_joints=list(cfg.robot.joints))
        except BundleError as exc:
            return cliopts.fail("duet follower-table", f"--planner {name}: {exc}",
                                cliopts.EXIT_USAGE)
    n = len(cfg.robot.joints)
    followers = {kind: (onnx_follower(args.followers / f"follower-{kind}.onnx", n)
                        if (args.followers / f"follower-{kind}.onnx").exists() else None)
                 for kind in ("none", "model-free", "learned")}
    log = (lambda _: None) if args.json else print
    result = table(cfg, followers, planners, episodes=1 if args.smoke else args.episodes,
                   refs=1, ref_s=4.0 if args.smoke else 12.0, holds=1 if args.smoke else 4,
                   seed=args.seed, log=log)
    (args.followers / "table.json").write_text(json.dumps(result, indent=2) + "\n")
    cliopts.emit(args, format_table(result), result)
    return 0 if result["ok"] else 1


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
                                 LoopSettings.from_config(cfg), two_step, cfg=cfg)
    try:
        finetune(args.init, args.dataset, args.out, sim, steps, args.seed,
                 args.threads or default_threads(), args.sim_fraction,
                 batch=8 if args.smoke else 32)
    except (DatasetError, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"duet train: {exc}") from None
    return 0


def _eval(args: argparse.Namespace) -> int:
    from policy.eval import run_eval

    if args.fact is not None:
        from policy.fact_eval import run_fact_eval

        for name in ("episodes", "grid_episodes", "workers"):
            if getattr(args, name) <= 0:
                raise SystemExit(f"duet eval: --{name.replace('_', '-')} must be positive")
        if any(k <= 0 for k in args.flow_steps) or any(d < 0 for d in args.delays_ms):
            raise SystemExit("duet eval: --flow-steps must be positive, --delays-ms >= 0")
        return run_fact_eval(args.bundle[0], args.fact, args.config, args.seed, args.episodes,
                             args.grid_episodes, args.flow_steps,
                             [d / 1e3 for d in args.delays_ms], args.fact_metrics,
                             args.decoder_latency, args.out, args.workers)
    ablation = args.episodes if args.ablation_episodes is None else args.ablation_episodes
    return run_eval(args.bundle, args.episodes, ablation, args.config, args.seed, args.json,
                    args.out, args.checkpoints, phrasing=args.phrasing)


def _train_fact(args: argparse.Namespace) -> int:
    from policy.fact_train import train_fact

    for name in ("code_len", "code_bits", "tokenizer_steps", "steps", "prefix_max", "threads"):
        if getattr(args, name) <= 0:
            raise SystemExit(f"duet train-fact: --{name.replace('_', '-')} must be positive")
    data = {**DATA, "held_out": 1000}
    steps = {"tokenizer_steps": args.tokenizer_steps, "planner_steps": args.steps}
    if args.smoke:
        data = {"episodes": 2, "scenes": 6, "walks": 20, "workers": 1, "held_out": 5}
        steps = {"tokenizer_steps": 20, "planner_steps": 5}
    train_fact(args.out, args.data_dir, args.config, seed=args.seed, threads=args.threads,
               code_len=args.code_len, code_bits=args.code_bits, prefix_max=args.prefix_max,
               episodes=data["episodes"], scenes=data["scenes"], walks=data["walks"],
               workers=data["workers"], held_out=data["held_out"],
               init_planner=args.init_planner, **steps)
    return 0


def _fact_study(args: argparse.Namespace) -> int:
    import json

    import torch

    from policy.fact_study import format_rows, study
    from policy.fact_train import fact_test_sets
    from policy.train import load_training_data

    torch.set_num_threads(args.threads)
    data = load_training_data(args.data_dir, args.config, DATA["episodes"], DATA["scenes"],
                              DATA["walks"], args.seed, DATA["workers"])
    train = data.actions["chunk"] - data.actions["q"][:, None]
    rows = study(train, fact_test_sets(data, args.seed), args.code_lens, args.code_bits,
                 args.steps, args.seed, args.decoder_steps, quantizer=args.quantizer)
    print(format_rows(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0
