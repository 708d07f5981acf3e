"""Followers judged by how the arm tracks, whatever produced the reference (lockstep sim, the
robot's own follower core: policy/rollout.py).

References: held-out excitation trajectories (shapes and speeds no planner makes), the chunks
of any planner bundle doing the sim's tasks (its own pipeline, its measured latency), and a
pure hold at rest poses, where the steady-state error is what gravity leaves. Followers: any
`ResidualModel`, or None (reference tracking). The table the robot's owner reads: tracking RMS
per reference and follower, the steady state at holds, and the two checks of a follower that
is planner-agnostic: it improves tracking over reference tracking for every reference, and
it holds where the model-free follower holds (within `STEADY_TOL_RAD`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from policy.eval import EVAL_SEED_BASE, BundlePlanner, eval_start_q
from policy.rollout import LoopSettings, run_episode
from runtime.config import DuetConfig
from runtime.follower.tracking import ResidualModel, Tracker
from runtime.model.bundle import load_bundle
from runtime.model.engines.onnxruntime_engine import OnnxRuntimeEngine
from runtime.model.residual import EngineResidual
from runtime.planner.excitation import Box, Excitation
from runtime.planner.observation import StateHistory
from sim.robot import describe
from sim.task import TIMEOUT, Episode, TaskTracker
from sim.world import SimWorld

STEADY_TOL_RAD = 0.005
HOLD_S = 2.5
SETTLED_S = 0.5  # the steady state is the mean error over the last this-many seconds


class TimeOnly(TaskTracker):
    """A task that is only a time limit (references and holds): no blocks, no success."""

    def start(self, world: SimWorld, t: float) -> None:
        world.place_blocks({})
        self.status = "running"
        self.t_start, self.t_end = t, None

    def update(self, world: SimWorld, t: float) -> str:
        if self.status == "running" and t - self.t_start >= self.timeout_s:
            self.status, self.t_end = TIMEOUT, t
        return self.status


def onnx_follower(path: Path, n_joints: int, lookahead: int = 8, lookahead_dt: float = 0.02
                  ) -> EngineResidual:
    """A follower graph (ref [1, L, J], q, dq -> residual) as the core runs it."""
    engine = OnnxRuntimeEngine(path, interruptible=False)
    takes = set(engine.inputs)
    return EngineResidual(engine, ref="ref", q="q" if "q" in takes else None,
                          dq="dq" if "dq" in takes else None, out="residual",
                          lookahead=lookahead, lookahead_dt=lookahead_dt,
                          joints=np.arange(n_joints), n_robot=n_joints)


@dataclass
class Result:
    rms_rad: float
    steady_rad: float | None = None  # holds: mean |q - target| once settled
    success: float | None = None  # planners: the sim task's success rate


def _chunk(exc: Excitation, horizon: int, dt_s: float
           ) -> Callable[[SimWorld, StateHistory, TaskTracker], tuple[np.ndarray, float]]:
    steps = (np.arange(horizon) + 1.0) * dt_s

    def plan(world: SimWorld, history: StateHistory, task: TaskTracker
             ) -> tuple[np.ndarray, float]:
        return exc.sample(world.time - task.t_start + steps), 0.0
    return plan


def excitation_refs(cfg: DuetConfig, count: int, seed: int, seconds: float
                    ) -> list[Excitation]:
    """Held-out excitation references: other seeds than identification's, around home."""
    lim, home = cfg.robot.limits, describe(cfg).home
    box = Box.around(home, 0.5, lim.position_min, lim.position_max, lim.velocity_max, 0.4)
    return [Excitation(home, box, seconds, 2, seed=10_000 + seed + i) for i in range(count)]


def hold_poses(cfg: DuetConfig, count: int, seed: int) -> list[np.ndarray]:
    lim = cfg.robot.limits
    box = Box.around(describe(cfg).home, 0.6, lim.position_min, lim.position_max,
                     lim.velocity_max, 1.0)
    rng = np.random.default_rng(20_000 + seed)
    return [rng.uniform(box.lo, box.hi) for _ in range(count)]


def track_references(cfg: DuetConfig, settings: LoopSettings, follower: ResidualModel | None,
                     refs: list[Excitation], horizon: int, dt_s: float) -> Result:
    world = SimWorld(seed=0, physics_hz=settings.physics_hz, robot=describe(cfg))
    rms = []
    for exc in refs:
        s = _with_timeout(settings, exc.duration)
        r = run_episode(world, Episode(0), _chunk(exc, horizon, dt_s), follower, s,
                        start_q=exc.start, task=TimeOnly(Episode(0), timeout_s=exc.duration))
        rms.append(r.tracking_rms)
    return Result(float(np.mean(rms)))


def hold(cfg: DuetConfig, settings: LoopSettings, follower: ResidualModel | None,
         poses: list[np.ndarray], horizon: int, dt_s: float) -> Result:
    world = SimWorld(seed=0, physics_hz=settings.physics_hz, robot=describe(cfg))
    steady, rms = [], []
    for pose in poses:
        exc = Excitation(pose, Box(pose, pose, np.ones_like(pose)), 0.0, 0)
        errors: list[np.ndarray] = []

        def record(t: float, q: np.ndarray, dq: np.ndarray, tracker: Tracker,
                   pose: np.ndarray = pose, errors: list[np.ndarray] = errors) -> None:
            if t >= HOLD_S - SETTLED_S:
                errors.append(np.abs(q - pose))
        r = run_episode(world, Episode(0), _chunk(exc, horizon, dt_s), follower,
                        _with_timeout(settings, HOLD_S), start_q=pose, tick_hook=record,
                        task=TimeOnly(Episode(0), timeout_s=HOLD_S))
        steady.append(float(np.mean(errors)))
        rms.append(r.tracking_rms)
    return Result(float(np.mean(rms)), steady_rad=float(np.mean(steady)))


def planner_chunks(settings: LoopSettings, cfg: DuetConfig, follower: ResidualModel | None,
                   bundle: Path, episodes: int) -> Result:
    world = SimWorld(seed=0, physics_hz=settings.physics_hz, robot=describe(cfg))
    plan_fn = BundlePlanner(load_bundle(bundle), cfg)
    plan_fn.warm_up(world)
    rms, ok = [], []
    for i in range(episodes):
        seed = EVAL_SEED_BASE + i
        # this robot's blocks, start poses (its workspace, its home)
        episode = Episode(seed, two_step_fraction=1.0, workspace=world.robot.workspace)
        plan_fn.reset(episode.instruction)
        r = run_episode(world, episode, plan_fn, follower, settings,
                        start_q=eval_start_q(seed, world.robot))
        rms.append(r.tracking_rms)
        ok.append(r.success)
    return Result(float(np.mean(rms)), success=float(np.mean(ok)))


def _with_timeout(settings: LoopSettings, seconds: float) -> LoopSettings:
    from dataclasses import replace
    return replace(settings, timeout_s=seconds)


def table(cfg: DuetConfig, followers: Mapping[str, ResidualModel | None],
          planners: dict[str, Path], episodes: int = 4, refs: int = 2, ref_s: float = 12.0,
          holds: int = 4, seed: int = 0, log: Callable[[str], None] = print
          ) -> dict[str, Any]:
    """Rows: references (held-out excitation, each planner, hold); columns: followers."""
    settings = LoopSettings.from_config(cfg)
    horizon, dt_s = 10, 0.1
    exc = excitation_refs(cfg, refs, seed, ref_s)
    poses = hold_poses(cfg, holds, seed)
    rows: dict[str, dict[str, Result]] = {"excitation (held out)": {}, "hold": {}}
    rows.update({f"planner: {name}": {} for name in planners})
    for fname, follower in followers.items():
        t0 = time.monotonic()
        rows["excitation (held out)"][fname] = track_references(cfg, settings, follower, exc,
                                                                horizon, dt_s)
        rows["hold"][fname] = hold(cfg, settings, follower, poses, horizon, dt_s)
        for pname, path in planners.items():
            rows[f"planner: {pname}"][fname] = planner_chunks(settings, cfg, follower, path,
                                                              episodes)
        log(f"  follower {fname}: {time.monotonic() - t0:.0f} s")
    return judge(rows)


def judge(rows: dict[str, dict[str, Result]]) -> dict[str, Any]:
    """The table as data, with the planner-agnostic checks of the learned follower."""
    checks: list[dict[str, Any]] = []
    for ref, cells in rows.items():
        if "learned" in cells and "none" in cells:
            checks.append({"check": f"learned improves on reference tracking: {ref}",
                           "ok": cells["learned"].rms_rad < cells["none"].rms_rad,
                           "learned_mrad": cells["learned"].rms_rad * 1e3,
                           "none_mrad": cells["none"].rms_rad * 1e3})
    hold_cells = rows.get("hold", {})
    if "learned" in hold_cells and "model-free" in hold_cells:
        a, b = hold_cells["learned"].steady_rad, hold_cells["model-free"].steady_rad
        gap = abs((a or 0.0) - (b or 0.0))
        checks.append({"check": "learned holds where model-free holds (steady state within "
                       f"{STEADY_TOL_RAD * 1e3:g} mrad)", "ok": gap <= STEADY_TOL_RAD,
                       "gap_mrad": gap * 1e3})
    return {"rows": {ref: {f: vars(r) for f, r in cells.items()} for ref, cells in rows.items()},
            "checks": checks, "ok": all(c["ok"] for c in checks)}


def format_table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    followers = list(next(iter(rows.values())))
    lines = [f"{'reference':<28}" + "".join(f"{f:>16}" for f in followers)
             + "   (tracking RMS mrad; hold: steady state mrad)"]
    for ref, cells in rows.items():
        def cell(c: dict[str, Any]) -> str:
            text = f"{c['rms_rad'] * 1e3:.2f}"
            if c.get("steady_rad") is not None:
                text += f" / {c['steady_rad'] * 1e3:.2f}"
            if c.get("success") is not None:
                text += f" ({c['success']:.0%})"
            return text
        lines.append(f"{ref:<28}" + "".join(f"{cell(cells[f]):>16}" for f in followers))
    lines += [f"{'PASS' if c['ok'] else 'FAIL'}: {c['check']}" for c in result["checks"]]
    return "\n".join(lines)
