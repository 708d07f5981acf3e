"""`duet eval --fact BUNDLE`: what the FACT planner costs on the robot (issue 13).

The same lockstep closed loop as `duet eval` (`policy.eval.evaluate`: the robot's
`FollowerCore`, the runtime's `PlannerPipeline`, the bundle's follower residual, fixed
two-step episode seeds disjoint from the training data), in three tables:

1. the reference bundle vs the FACT bundle at decoder steps K: success, planner latency
   p50/p99 (the whole pipeline call, measured, also the simulated latency), and the
   tokenizer's reconstruction error at that K (from `duet train-fact`'s metrics);
2. the FACT planner at the contract's K: prefix conditioning on/off x chunk strategy (duet's
   follower blend, and the peers': openpi's broker, LeRobot's 0.3/0.7 average, switch) x an
   injected planner delay: success, boundary velocity step and jerk, tracking RMS;
3. the decoder's latency per K (ONNX Runtime fp32 / int8, PyTorch eager) from
   bench/fact_decoder.py's JSON, when given.

Cells run in `workers` processes (each its own sim); a cell's planner latency is its wall
clock, so a loaded machine shows up as latency, as it would on a robot. With an injected
delay the follower's plan timeout grows by that delay (a plan late by design is not stale).
Each finished cell is kept in OUT/cells/ (a rerun skips it). Writes fact-eval.md,
fact-eval.png and fact-eval.json.
"""

from __future__ import annotations

import json
import multiprocessing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policy.eval import EVAL_SEED_BASE, Log, evaluate
from policy.rollout import LoopSettings
from runtime.config import load_config
from runtime.follower.reference import STRATEGIES
from runtime.model.bundle import load_bundle


@dataclass(frozen=True)
class Cell:
    table: str  # "planners" or "grid"
    name: str
    bundle: str
    flow_steps: int | None
    prefix: bool
    strategy: str
    delay_s: float
    episodes: int


def _run_cell(cell: Cell, config: str, first_seed: int) -> dict[str, Any]:
    cfg = load_config(Path(config))
    bundle = load_bundle(Path(cell.bundle), expect_joints=list(cfg.robot.joints))
    # a plan that is late by design is not stale: the timeout grows by the injected delay
    timeout = cfg.follower.plan_timeout_ms / 1e3 + cell.delay_s
    settings = LoopSettings.from_config(cfg, dt_s=bundle.contract.planner.actions.dt_s,
                                        strategy=cell.strategy, plan_timeout_s=timeout)
    seeds = [first_seed + i for i in range(cell.episodes)]
    planner: dict[str, Any] = {"prefix": cell.prefix, "delay_s": cell.delay_s}
    if cell.flow_steps is not None:
        planner["flow_steps"] = cell.flow_steps
    summary = evaluate(bundle, cfg, settings, seeds, True, print, cell.name, **planner)
    return {**asdict(cell), "summary": summary}


def _slug(cell: Cell, first_seed: int) -> str:
    """A cell's result file: every setting that changes it (so a rerun reuses only the
    same cell on the same seeds and bundle)."""
    bundle = Path(cell.bundle)
    version = json.loads((bundle / "manifest.json").read_text()).get("version", "")
    return (f"{bundle.name}-{version}-k{cell.flow_steps}-p{int(cell.prefix)}-{cell.strategy}"
            f"-d{cell.delay_s * 1e3:.0f}-n{cell.episodes}-s{first_seed}")


def _run_and_save(job: tuple[Cell, str, int, Path]) -> None:
    cell, config, first_seed, path = job
    row = _run_cell(cell, config, first_seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row) + "\n")
    tmp.replace(path)


def plan_cells(reference: Path, fact: Path, flow_steps: list[int], episodes: int,
               grid_episodes: int, delays_s: list[float]) -> list[Cell]:
    """Every cell of tables 1 and 2, the slowest first (they bound the wall time)."""
    cells = [Cell("planners", "reference", str(reference), None, True, "blend", 0.0,
                  episodes)]
    cells += [Cell("planners", f"FACT K={k}", str(fact), k, True, "blend", 0.0, episodes)
              for k in flow_steps]
    for delay in delays_s:
        for prefix in (True, False):
            for strategy in STRATEGIES:
                cells.append(Cell("grid", f"prefix {'on' if prefix else 'off'}, {strategy}, "
                                  f"{delay * 1e3:.0f} ms", str(fact), None, prefix, strategy,
                                  delay, grid_episodes))
    return sorted(cells, key=lambda c: -c.episodes * (1 + (c.flow_steps or 4) / 8))


def _recon(metrics: dict[str, Any] | None, k: int | None) -> dict[str, float] | None:
    """The tokenizer's round-trip RMSE (rad) at K on the rollout chunks, if measured."""
    if metrics is None or k is None:
        return None
    got = metrics["reconstruction"]["rollouts"]["fact"].get(str(k))
    return None if got is None else {"rmse_rad": got["rmse_rad"], "mae_rad": got["mae_rad"]}


def _fmt(x: float | None, spec: str) -> str:
    return "—" if x is None else format(x, spec)


def render_markdown(report: dict[str, Any]) -> str:
    lines = ["# FACT planner: closed-loop evaluation", "",
             f"Two-step episodes, seeds from {report['first_seed']} (the same seeds in every "
             f"row); sim physics {report['physics_hz']:.0f} Hz, follower "
             f"{report['follower_hz']:.0f} Hz through the robot's FollowerCore with the "
             f"bundle's residual, planner {report['planner_hz']:.0f} Hz (its measured latency, "
             "plus any injected delay, is the simulated latency).", "",
             "## Reference vs FACT, decoder steps K", "",
             "| planner | episodes | success | planner p50 (ms) | planner p99 (ms) "
             "| decoder share p50 (ms) | tokenizer RMSE at K (mrad) |",
             "|---|---|---|---|---|---|---|"]
    for row in report["planners"]:
        s = row["summary"]
        dec = s["stage_ms"].get("decoder", {}).get("p50")
        recon = row.get("reconstruction")
        lines.append(
            f"| {row['name']} | {s['episodes']} | {s['success_rate']:.1%} "
            f"({s['successes']}/{s['episodes']}) | {s['planner_latency_ms_p50']:.1f} "
            f"| {s['planner_latency_ms_p99']:.1f} | {_fmt(dec, '.2f')} "
            f"| {_fmt(recon['rmse_rad'] * 1e3 if recon else None, '.2f')} |")
    rec = report.get("reconstruction")
    if rec:
        lines += ["", f"Reconstruction at {rec['bits']} bits per chunk (RMSE, mrad; FACT at its "
                  "best K):", "", "| chunks | FACT | uniform binning | DCT | FACT / binning |",
                  "|---|---|---|---|---|"]
        for name, r in rec["sets"].items():
            lines.append(f"| {name} ({r['chunks']}) | {r['fact'] * 1e3:.2f} "
                         f"| {r['binning'] * 1e3:.2f} | {r['dct'] * 1e3:.2f} "
                         f"| {r['fact'] / r['binning']:.3f} |")
    lines += ["", "## Prefix conditioning x chunk strategy x injected planner delay", "",
              f"FACT at the bundle's K; {report['grid_episodes']} episodes per cell. Boundary "
              "Δv and jerk: per episode the largest at any chunk boundary, then the median "
              "over episodes (max in brackets).", "",
              "| delay | prefix | strategy | success | boundary Δv (rad/s) "
              "| boundary jerk (rad/s³) | tracking RMS (mrad) |", "|---|---|---|---|---|---|---|"]
    for row in report["grid"]:
        s = row["summary"]
        v, j = s["boundary_vel_step_rad_s"], s["boundary_jerk_rad_s3"]
        lines.append(
            f"| {row['delay_s'] * 1e3:.0f} ms | {'on' if row['prefix'] else 'off'} "
            f"| {row['strategy']} | {s['success_rate']:.0%} ({s['successes']}/{s['episodes']}) "
            f"| {v['median']:.3f} ({v['max']:.3f}) | {j['median']:.0f} ({j['max']:.0f}) "
            f"| {s['tracking_rms_rad'] * 1e3:.1f} |")
    dec = report.get("decoder_latency")
    if dec:
        engines = list(dec["decoder"])
        lines += ["", "## Decoder latency per K (1 thread, batch 1; p50 / p99 ms)", "",
                  "| K | " + " | ".join(engines) + " |", "|---" * (len(engines) + 1) + "|"]
        for k in next(iter(dec["decoder"].values())):
            lines.append(f"| {k} | " + " | ".join(
                f"{dec['decoder'][e][k]['p50_ms']:.2f} / {dec['decoder'][e][k]['p99_ms']:.2f}"
                for e in engines) + " |")
        lines += ["", "Largest K with the decoder's p99 under 10 ms: " + ", ".join(
            f"{e} K={k}" for e, k in dec["largest_k_under_budget"].items()) + "."]
    return "\n".join(lines) + "\n"


def render_plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(18, 4.6))
    rows = report["planners"]
    names = [r["name"] for r in rows]
    axes[0].bar(names, [100 * r["summary"]["success_rate"] for r in rows], color="tab:blue")
    axes[0].axhline(95, color="tab:red", linestyle="--", label="target 95 %")
    axes[0].set_ylabel("success (%)")
    axes[0].set_ylim(0, 100)
    ax2 = axes[0].twinx()
    ax2.plot(names, [r["summary"]["planner_latency_ms_p50"] for r in rows], "o-",
             color="tab:orange", label="planner p50 (ms)")
    ax2.set_ylabel("planner latency p50 (ms)")
    axes[0].legend(loc="lower left")
    axes[0].tick_params(axis="x", rotation=20)
    grid = report["grid"]
    delays = sorted({r["delay_s"] for r in grid})
    combos = [(p, s) for p in (True, False) for s in STRATEGIES]
    width = 0.8 / len(combos)
    for i, (p, s) in enumerate(combos):
        cells = {r["delay_s"]: r["summary"] for r in grid
                 if r["prefix"] == p and r["strategy"] == s}
        x = np.arange(len(delays)) + (i - len(combos) / 2) * width
        hatch = None if p else "//"
        axes[1].bar(x, [100 * cells[d]["success_rate"] for d in delays], width,
                    label=f"{s}, prefix {'on' if p else 'off'}", hatch=hatch,
                    color=f"C{STRATEGIES.index(s)}")
        axes[2].bar(x, [cells[d]["boundary_vel_step_rad_s"]["median"] for d in delays], width,
                    hatch=hatch, color=f"C{STRATEGIES.index(s)}")
    for ax, label in ((axes[1], "success (%)"), (axes[2], "boundary Δv, median (rad/s, log)")):
        ax.set_xticks(np.arange(len(delays)), [f"{d * 1e3:.0f} ms" for d in delays])
        ax.set_xlabel("injected planner delay")
        ax.set_ylabel(label)
    axes[1].axhline(90, color="tab:red", linestyle="--")
    axes[2].set_yscale("log")
    handles, labels = axes[1].get_legend_handles_labels()
    axes[2].legend(handles, labels, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _reconstruction(metrics: dict[str, Any], bits: int) -> dict[str, Any]:
    sets = {}
    for name, r in metrics["reconstruction"].items():
        sets[name] = {"chunks": r["chunks"],
                      "fact": min(v["rmse_rad"] for v in r["fact"].values()),
                      "binning": r["uniform_binning"]["rmse_rad"], "dct": r["dct"]["rmse_rad"]}
    return {"bits": bits, "sets": sets}


def run_fact_eval(reference: Path, fact: Path, config: Path, seed: int, episodes: int,
                  grid_episodes: int, flow_steps: list[int], delays_s: list[float],
                  fact_metrics: Path | None, decoder_latency: Path | None, out_dir: Path,
                  workers: int, log: Log = print) -> int:
    cfg = load_config(config)
    base = LoopSettings.from_config(cfg)
    first = EVAL_SEED_BASE + seed
    cells = plan_cells(reference, fact, flow_steps, episodes, grid_episodes, delays_s)
    log(f"fact eval: {len(cells)} cells ({episodes} episodes per planner row, "
        f"{grid_episodes} per grid cell), {workers} worker(s)")
    done = out_dir / "cells"
    done.mkdir(parents=True, exist_ok=True)
    todo = [(c, str(config), first, done / f"{_slug(c, first)}.json") for c in cells]
    todo = [t for t in todo if not t[3].is_file()]
    log(f"{len(cells) - len(todo)} cell(s) already in {done}")
    if workers > 1:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            for _ in pool.imap_unordered(_run_and_save, todo):
                pass
    else:
        for t in todo:
            _run_and_save(t)
    rows = [json.loads((done / f"{_slug(c, first)}.json").read_text()) for c in cells]
    metrics = json.loads(fact_metrics.read_text()) if fact_metrics else None
    names = ["reference", *[f"FACT K={k}" for k in flow_steps]]
    planners = sorted((r for r in rows if r["table"] == "planners"),
                      key=lambda r: names.index(r["name"]))
    for r in planners:
        r["reconstruction"] = _recon(metrics, r["flow_steps"])
    grid = sorted((r for r in rows if r["table"] == "grid"),
                  key=lambda r: (r["delay_s"], not r["prefix"], STRATEGIES.index(r["strategy"])))
    codes = load_bundle(fact).contract.planner.stages[0].outputs[0].shape or [1, 0, 0]
    report: dict[str, Any] = {
        "first_seed": first, "episodes": episodes, "grid_episodes": grid_episodes,
        "physics_hz": base.physics_hz, "follower_hz": base.follower_hz,
        "planner_hz": base.planner_hz, "reference": str(reference), "fact": str(fact),
        "planners": planners, "grid": grid,
        "reconstruction": _reconstruction(metrics, codes[1] * codes[2]) if metrics else None,
        "decoder_latency": json.loads(decoder_latency.read_text()) if decoder_latency else None}
    out_dir.mkdir(parents=True, exist_ok=True)
    md = render_markdown(report)
    (out_dir / "fact-eval.md").write_text(md)
    render_plot(report, out_dir / "fact-eval.png")
    (out_dir / "fact-eval.json").write_text(json.dumps(report, indent=1) + "\n")
    print(md)
    log(f"wrote {out_dir}/fact-eval.md, fact-eval.png, fact-eval.json")
    return 0
