"""Closed-loop evaluation of bundles in the sim (lockstep, fixed seeds).

Each run drives `policy.rollout.run_episode` -- the robot's own follower core -- with the
bundle's planner through the runtime's `PlannerPipeline` (the planner process's code: the
contract's cameras rendered by the sim, the state history, the instruction, the action
prefix; called at planner_hz, its measured wall-clock latency, plus any injected delay,
delaying the plan in simulated time) and the bundle's follower model through the runtime's
residual adapter, at follower_hz, with sim physics at physics_hz. Episodes are two-step
instructions ("touch the X block, then the Y one") from seeds disjoint from the training data.

Rows: every bundle (precision) with the follower residual on and the configured strategy;
for the first bundle also residual off and every other chunk strategy. Columns: success rate,
mean time to success, tracking RMS, boundary velocity step and jerk, safety clamps.
A latency table compares ONNX Runtime per precision with PyTorch eager.
Writes eval.md, eval.png and eval.json.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from policy.rollout import EpisodeResult, LoopSettings, run_episode
from runtime.config import DuetConfig, SimConfig, load_config
from runtime.follower.reference import STRATEGIES
from runtime.model.bundle import Bundle, load_bundle
from runtime.model.plan import Plan
from runtime.model.residual import residual_model
from runtime.planner.observation import StateHistory
from runtime.planner.pipeline import Observation, PlannerPipeline
from sim.robot import RobotDescription, describe
from sim.success import TargetJudge, describe_measure
from sim.task import Episode, TaskTracker
from sim.world import SimWorld

EVAL_SEED_BASE = 900_000_000  # training seeds are seed * 1_000_003 + i: far below this
START_NOISE = (0.3, 0.2, 0.0)  # rad around home: base yaw, other arm joints, gripper
Log = Callable[[str], None]


def eval_start_q(seed: int, robot: RobotDescription) -> np.ndarray:
    """A start pose of `robot` near its home, from the episode's seed."""
    rng = np.random.default_rng(seed)
    noise = robot.start_noise(START_NOISE[1], START_NOISE[0], START_NOISE[2])
    return robot.home + rng.uniform(-1.0, 1.0, robot.n) * noise


class BundlePlanner:
    """A bundle's planner as a rollout PlanFn, through the runtime's own pipeline: the
    measured call time (plus `delay_s`, an injected planner delay) is the simulated latency;
    the plan it returned last is the action prefix of the next."""

    def __init__(self, bundle: Bundle, cfg: DuetConfig, flow_steps: int | None = None,
                 prefix: bool = True, delay_s: float = 0.0, seed: int = 0) -> None:
        self.pipeline = PlannerPipeline(bundle, list(cfg.robot.joints), flow_steps=flow_steps,
                                        prefix=prefix, seed=seed)
        cams = cfg.planner.cameras
        self.cameras = {name: (cams[name].width, cams[name].height) if name in cams
                        else (96, 96) for name in self.pipeline.camera_names()}
        self.delay_s = delay_s
        self.latencies: list[float] = []
        self.previous: Plan | None = None

    def reset(self, instruction: str) -> None:
        self.pipeline.set_instruction(instruction)
        self.previous = None

    def warm_up(self, world: SimWorld, calls: int = 3,
                instruction: str = "touch the red block, then the blue one") -> None:
        """A few plans, not counted: an engine's first calls (lazy initialisation, cold
        caches) are no planner latency an episode would see."""
        q = world.q()
        history = StateHistory(len(q))
        history.add(1, q=q, dq=np.zeros_like(q), q_cmd=q)
        self.reset(instruction)
        for _ in range(calls):
            self(world, history, TaskTracker(Episode(0, workspace=world.robot.workspace),
                                             timeout_s=1.0))
        self.latencies.clear()
        self.previous = None

    def __call__(self, world: SimWorld, history: StateHistory, task: TaskTracker
                 ) -> tuple[np.ndarray, float]:
        frames = {name: world.render(name, w, h) for name, (w, h) in self.cameras.items()}
        t_obs = history.latest_t_ns
        expected = (self.latencies[-1] if self.latencies else 0.0) + self.delay_s
        t0 = time.perf_counter()
        out = self.pipeline.plan(Observation(frames, history, t_obs), self.previous,
                                 expected).copy()
        latency = time.perf_counter() - t0
        self.latencies.append(latency)
        self.previous = Plan(out, self.pipeline.dt_s, t_obs / 1e9,
                             t_obs / 1e9 + latency + self.delay_s)
        return out, latency + self.delay_s


def evaluate(bundle: Bundle, cfg: DuetConfig, settings: LoopSettings, seeds: list[int],
             residual: bool, log: Log = print, label: str = "", phrasing: str = "then",
             **planner: Any) -> dict[str, Any]:
    """Run the episodes of `seeds` with one bundle and loop settings; summarise them."""
    robot = describe(cfg)
    world = SimWorld(seed=0, physics_hz=settings.physics_hz, robot=robot)
    plan_fn = BundlePlanner(bundle, cfg, **planner)
    follower = residual_model(bundle, list(robot.joints)) if residual else None
    measure = (cfg.sim or SimConfig()).success
    if measure.instruction:
        plan_fn.warm_up(world, instruction=measure.instruction)
    else:
        plan_fn.warm_up(world)
    results: list[EpisodeResult] = []
    t0 = time.monotonic()
    for seed in seeds:
        episode = Episode(seed, two_step_fraction=1.0, phrasing=phrasing,
                          workspace=robot.workspace)
        # the touch task judges by its blocks (run_episode's default); a company's task by
        # its target (sim.success)
        judge = None if measure.kind == "blocks" else TargetJudge(
            episode, measure, world, list(robot.joints), settings.timeout_s)
        plan_fn.reset(measure.instruction or episode.instruction)
        results.append(run_episode(world, episode, plan_fn, follower, settings,
                                   start_q=eval_start_q(seed, robot), task=judge))
    summary = summarise(results)
    summary["planner_latency_ms_p50"] = float(np.median(plan_fn.latencies) * 1e3)
    summary["planner_latency_ms_p99"] = float(np.percentile(plan_fn.latencies, 99) * 1e3)
    summary["stage_ms"] = plan_fn.pipeline.stage_ms()
    summary["wall_s"] = round(time.monotonic() - t0, 1)
    log(f"  {label}: success {summary['success_rate']:.1%} over {len(seeds)} episodes, "
        f"mean time {_fmt(summary['mean_time_to_success_s'], '.2f')} s ({summary['wall_s']} s)")
    return summary


def summarise(results: list[EpisodeResult]) -> dict[str, Any]:
    ok = [r for r in results if r.success]
    steps = [max(r.boundary_vel_step, default=0.0) for r in results]
    jerks = [max(r.boundary_jerk, default=0.0) for r in results]
    return {
        "episodes": len(results), "successes": len(ok),
        "success_rate": len(ok) / len(results) if results else 0.0,
        "mean_time_to_success_s": float(np.mean([r.duration_s for r in ok])) if ok else None,
        "tracking_rms_rad": float(np.mean([r.tracking_rms for r in results])),
        # per episode: the largest value at any plan boundary; then median and max over them
        "boundary_vel_step_rad_s": {"median": float(np.median(steps)), "max": float(max(steps))},
        "boundary_jerk_rad_s3": {"median": float(np.median(jerks)), "max": float(max(jerks))},
        "clamped_commands": int(sum(r.clamped for r in results)),
        "failures": [asdict(r) | {"boundary_vel_step": None, "boundary_jerk": None}
                     for r in results if not r.success][:20],
    }


def _percentiles(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples) * 1e3
    return {"p50_ms": float(np.median(a)), "p99_ms": float(np.percentile(a, 99))}


def measure_latency(bundle: Bundle, cfg: DuetConfig, n_planner: int = 100,
                    n_follower: int = 2000) -> dict[str, dict[str, float]]:
    """ONNX Runtime latency (1 thread, I/O binding) of the whole planner pipeline on sim
    observations, and of the follower model on contract-shaped inputs."""
    robot = describe(cfg)
    world = SimWorld(seed=1, robot=robot)
    plan_fn = BundlePlanner(bundle, cfg)
    plan_fn.reset("touch the red block, then the blue one")
    history = StateHistory(robot.n)
    home = robot.home
    history.add(1, q=home, dq=np.zeros(robot.n))
    task = TaskTracker(Episode(1, workspace=robot.workspace), timeout_s=10.0)
    for _ in range(10):
        plan_fn(world, history, task)
    plan_fn.latencies.clear()
    for _ in range(n_planner):
        plan_fn(world, history, task)
    out = {"planner": _percentiles(plan_fn.latencies)}
    model = residual_model(bundle, list(robot.joints))
    if model is not None:
        ref, q = np.tile(home, (model.lookahead, 1)), home.copy()
        times = []
        for i in range(n_follower + 10):
            t0 = time.perf_counter()
            model.residual(ref, q, q)
            if i >= 10:
                times.append(time.perf_counter() - t0)
        out["follower"] = _percentiles(times)
    else:
        out["follower"] = {"p50_ms": 0.0, "p99_ms": 0.0}
    return out


def measure_torch_latency(checkpoints: Path, n_planner: int = 100, n_follower: int = 2000
                          ) -> dict[str, dict[str, float]]:
    """PyTorch eager latency (1 thread, no_grad) of the source checkpoints."""
    import torch

    from policy.models import example_inputs, load_checkpoint

    torch.set_num_threads(1)
    out: dict[str, dict[str, float]] = {}
    for name, n in (("planner", n_planner), ("follower", n_follower)):
        model, _ = load_checkpoint(checkpoints / f"{name}.pt")
        inputs = example_inputs(model)
        times = []
        with torch.inference_mode():
            for _ in range(10):
                model(*inputs)
            for _ in range(n):
                t0 = time.perf_counter()
                model(*inputs)
                times.append(time.perf_counter() - t0)
        out[name] = _percentiles(times)
    return out


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# duet closed-loop evaluation", "",
             f"{report['episodes']} two-step episodes ({report.get('phrasing', 'then')!r} "
             "phrasing) per main row "
             f"({report['ablation_episodes']} per ablation row), seeds from "
             f"{report['first_seed']}; sim physics {report['physics_hz']:.0f} Hz, follower "
             f"{report['follower_hz']:.0f} Hz, planner {report['planner_hz']:.0f} Hz "
             "(measured latency simulated as delay).", "",
             "Success: " + report.get("success_measure", {}).get(
                 "text", "the sim's touch task") + ".", "",
             "| run | precision | residual | strategy | success | mean time to success (s) "
             "| tracking RMS (rad) | boundary Δv max (rad/s) | boundary jerk max (rad/s³) "
             "| clamps |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in report["runs"]:
        s = row["summary"]
        lines.append(
            f"| {row['name']} | {row['precision']} | {'on' if row['residual'] else 'off'} "
            f"| {row['strategy']} | {s['success_rate']:.1%} ({s['successes']}/{s['episodes']}) "
            f"| {_fmt(s['mean_time_to_success_s'], '.2f')} | {s['tracking_rms_rad']:.4f} "
            f"| {s['boundary_vel_step_rad_s']['max']:.3f} "
            f"| {s['boundary_jerk_rad_s3']['max']:.0f} | {s['clamped_commands']} |")
    lines += ["", "## Latency (1 thread, batch 1)", "",
              "| engine | precision | planner p50 (ms) | planner p99 (ms) | follower p50 (ms) "
              "| follower p99 (ms) |", "|---|---|---|---|---|---|"]
    for row in report["latency"]:
        p, f = row["planner"], row["follower"]
        lines.append(f"| {row['engine']} | {row['precision']} | {p['p50_ms']:.3f} "
                     f"| {p['p99_ms']:.3f} | {f['p50_ms']:.4f} | {f['p99_ms']:.4f} |")
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    names = [r["name"] for r in report["runs"]]
    rates = [100 * r["summary"]["success_rate"] for r in report["runs"]]
    axes[0].barh(names, rates, color="tab:blue")
    axes[0].axvline(90, color="tab:red", linestyle="--", label="target 90 %")
    axes[0].set_xlabel("success rate (%)")
    axes[0].set_xlim(0, 100)
    axes[0].legend(loc="lower left")
    axes[0].invert_yaxis()
    jerk = [r["summary"]["boundary_jerk_rad_s3"]["max"] for r in report["runs"]]
    axes[1].barh(names, jerk, color="tab:orange")
    axes[1].set_xscale("log")
    axes[1].set_xlabel("max jerk at chunk boundaries (rad/s³, log)")
    axes[1].invert_yaxis()
    labels = [f"{r['engine']} {r['precision']}" for r in report["latency"]]
    x = np.arange(len(labels))
    axes[2].bar(x - 0.2, [r["planner"]["p50_ms"] for r in report["latency"]], 0.4,
                label="planner p50")
    axes[2].bar(x + 0.2, [r["follower"]["p50_ms"] for r in report["latency"]], 0.4,
                label="follower p50")
    axes[2].set_yscale("log")
    axes[2].set_xticks(x, labels, rotation=20)
    axes[2].set_ylabel("latency (ms, log)")
    axes[2].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_eval(bundle_dirs: list[Path], episodes: int, ablation_episodes: int, config: Path,
             seed: int, json_path: Path | None, out_dir: Path, checkpoints: Path | None,
             log: Log = print, phrasing: str = "then") -> int:
    """`ablation_episodes` 0: the bundles' main rows only."""
    if episodes <= 0 or ablation_episodes < 0:
        raise SystemExit("duet eval: --episodes must be positive, --ablation-episodes >= 0")
    cfg = load_config(config)
    base = LoopSettings.from_config(cfg)
    bundles = [load_bundle(d, expect_joints=list(cfg.robot.joints)) for d in bundle_dirs]
    precision = {b.path: b.precision() for b in bundles}
    first = EVAL_SEED_BASE + seed
    seeds = [first + i for i in range(episodes)]
    ab_seeds = seeds[:ablation_episodes]
    runs: list[dict[str, Any]] = []

    def add(name: str, bundle: Bundle, residual: bool, strategy: str, s: list[int]) -> None:
        settings = LoopSettings.from_config(cfg, dt_s=bundle.contract.planner.actions.dt_s,
                                            strategy=strategy)
        summary = evaluate(bundle, cfg, settings, s, residual, log, name, phrasing)
        runs.append({"name": name, "bundle": str(bundle.path),
                     "precision": precision[bundle.path], "residual": residual,
                     "strategy": strategy, "summary": summary})

    log(f"eval: {len(bundles)} bundle(s), {episodes} episodes (ablations {ablation_episodes})")
    for b in bundles:
        add(f"full {precision[b.path]}", b, True, base.core.strategy, seeds)
    ref = bundles[0]
    if ab_seeds:
        add("residual off", ref, False, base.core.strategy, ab_seeds)
    for strategy in STRATEGIES if ab_seeds else ():
        if strategy != base.core.strategy:
            add(f"strategy {strategy}", ref, True, strategy, ab_seeds)
    latency = [{"engine": "onnxruntime", "precision": precision[b.path],
                **measure_latency(b, cfg)} for b in bundles]
    if checkpoints is not None:
        latency.append({"engine": "pytorch eager", "precision": "fp32",
                        **measure_torch_latency(checkpoints)})
    report = {"episodes": episodes, "ablation_episodes": ablation_episodes, "first_seed": first,
              "phrasing": phrasing,
              "success_measure": {**(cfg.sim or SimConfig()).success.model_dump(),
                                  "text": describe_measure((cfg.sim or SimConfig()).success)},
              "physics_hz": base.physics_hz, "follower_hz": base.follower_hz,
              "planner_hz": base.planner_hz, "runs": runs, "latency": latency}
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report)
    (out_dir / "eval.md").write_text(md)
    render_plot(report, out_dir / "eval.png")
    text = json.dumps(report, indent=1) + "\n"
    (out_dir / "eval.json").write_text(text)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(text)
    print(md)
    log(f"wrote {out_dir}/eval.md, eval.png, eval.json")
    return 0
