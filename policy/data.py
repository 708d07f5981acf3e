"""Datasets from the sim in lockstep with the scripted expert (cached as .npz under data/).

Every episode runs through `policy.rollout.run_episode`, i.e. the runtime's own tracking path:
the expert is the planner, the servo inverse dynamics (`policy.servo_target`) is the
follower. Coverage beyond the expert's own path (DART-style noise injection):

- the *executed* chunk is the expert's plus a random per-plan offset (sigma drawn per
  episode), so the arm drifts off the ideal path and the next observation needs recovery;
- plans are delivered after a random delay (0-80 ms), like a real planner's latency;
- the executed residual is the inverse-dynamics one scaled by a per-episode factor in
  {0, 0.5, 1} plus noise, so states with and without servo-lag compensation both appear;
- episodes start from a random pose near home or where the previous episode ended.

Labels stay clean: the planner sample at an observation is the expert's chunk for that
exact state; the follower sample is the inverse-dynamics residual for the window it saw.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from policy.rollout import LoopSettings, run_episode
from policy.servo_target import ServoResidualTarget
from policy.synth import scene_labels
from runtime.config import DuetConfig
from runtime.model.bundle import sha256_file
from runtime.model.tokenizer import Tokenizer
from runtime.planner.observation import StateHistory
from sim.expert import expert_chunk
from sim.robot import ARM_MJCF, RobotDescription, describe
from sim.task import Episode, TaskTracker
from sim.world import SimWorld

DATA_VERSION = 2
HORIZON = 10
FOLLOWER_RECORD_EVERY = 5  # ticks: 100 Hz of follower samples at a 500 Hz follower
# rad around home: on the base yaw, on the other arm joints, on the gripper (start_noise)
START_NOISE = (0.5, 0.3, 0.05)
MAX_CHUNK_NOISE = (0.12, 0.1, 0.02)  # rad, per-plan offset sigma, as START_NOISE
MAX_DELAY_S = 0.08

Log = Callable[[str], None]


def episode_seed(seed: int, i: int) -> int:
    """Training episode seeds; evaluation uses seeds from EVAL_SEED_BASE up (disjoint)."""
    return seed * 1_000_003 + i


class _InverseDynamicsFollower:
    """A `ResidualModel` that executes and records (window, q, dq) -> target residual."""

    lookahead = 8
    lookahead_dt = 0.02

    def __init__(self, world: SimWorld, residual_max: float, tick_dt: float) -> None:
        self.target = ServoResidualTarget(world.model, world.position_kp, world.position_kd,
                                          residual_max, world.robot)
        n = world.robot.n
        self.tick_dt = tick_dt
        self.scale = 1.0
        self.noise = 0.0
        self.rng = np.random.default_rng(0)
        self.calls = 0
        self._out = np.zeros(n)
        self.samples: dict[str, list[np.ndarray]] = {"ref": [], "q": [], "dq": [], "residual": []}

    def residual(self, ref: np.ndarray, q: np.ndarray, dq: np.ndarray) -> np.ndarray:
        # the network sees float32 inputs: record and compute on exactly those
        ref32, q32, dq32 = (a.astype(np.float32) for a in (ref, q, dq))
        target = self.target.from_window(ref32.astype(np.float64), q32.astype(np.float64),
                                         dq32.astype(np.float64), self.tick_dt)
        if self.calls % FOLLOWER_RECORD_EVERY == 0:
            self.samples["ref"].append(ref32)
            self.samples["q"].append(q32)
            self.samples["dq"].append(dq32)
            self.samples["residual"].append(target.astype(np.float32))
        self.calls += 1
        self._out[:] = self.scale * target + self.rng.normal(0, self.noise, len(self._out))
        return self._out


def expert_plan(world: SimWorld, task: TaskTracker, q: np.ndarray, dt: float) -> np.ndarray:
    return expert_chunk(world, task.remaining(), q, horizon=HORIZON, dt=dt)


def generate(episodes: int, seed: int, settings: LoopSettings, two_step_fraction: float = 0.5,
             log: Log = print, robot: RobotDescription | None = None
             ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Roll out `episodes` expert episodes on `robot` (default duet's arm); return (planner
    data, follower data, stats)."""
    tok = Tokenizer()
    world = SimWorld(seed=seed, physics_hz=settings.physics_hz, robot=robot)
    robot = world.robot
    start_noise = robot.start_noise(START_NOISE[1], START_NOISE[0], START_NOISE[2])
    chunk_noise = robot.start_noise(MAX_CHUNK_NOISE[1], MAX_CHUNK_NOISE[0], MAX_CHUNK_NOISE[2])
    tick_dt = 1.0 / settings.follower_hz
    follower = _InverseDynamicsFollower(world, settings.core.residual_max, tick_dt)
    planner: dict[str, list[np.ndarray]] = {}
    follower_episode: list[int] = []
    successes, t0 = 0, time.monotonic()
    for i in range(episodes):
        ep_seed = episode_seed(seed, i)
        rng = np.random.default_rng(ep_seed)
        episode = Episode(ep_seed, two_step_fraction, workspace=robot.workspace)
        tokens = tok.encode(episode.instruction)
        sigma = chunk_noise * rng.uniform(0.0, 1.0)
        delay = rng.uniform(0.0, MAX_DELAY_S)
        start = None  # where the previous episode ended
        if i == 0 or rng.random() >= 0.3:
            start = np.clip(robot.home + rng.uniform(-1, 1, robot.n) * start_noise,
                            settings.core.pos_min, settings.core.pos_max)

        def plan(world: SimWorld, history: StateHistory, task: TaskTracker,
                 i: int = i, tokens: np.ndarray = tokens, sigma: np.ndarray = sigma,
                 delay: float = delay, rng: np.random.Generator = rng
                 ) -> tuple[np.ndarray, float]:
            q = history.latest("q").copy()
            chunk = expert_plan(world, task, q, settings.dt_s)
            sample = {"image": world.render(), "tokens": tokens, "q": q.astype(np.float32),
                      "chunk": chunk.astype(np.float32), "episode": np.int32(i),
                      **scene_labels(task.episode, len(task.touched))}
            for k, v in sample.items():
                planner.setdefault(k, []).append(v)
            ramp = np.linspace(0.2, 1.0, chunk.shape[0])[:, None]
            return chunk + ramp * rng.normal(0.0, 1.0, robot.n) * sigma, delay

        calls_before = len(follower.samples["q"])
        follower.scale = float(rng.choice([0.0, 0.5, 1.0]))
        follower.noise, follower.rng = 0.005, rng
        result = run_episode(world, episode, plan, follower, settings, start_q=start)
        follower_episode += [i] * (len(follower.samples["q"]) - calls_before)
        successes += result.success
        if (i + 1) % max(1, episodes // 10) == 0 or i + 1 == episodes:
            log(f"  data: {i + 1}/{episodes} episodes, {len(planner['q'])} planner / "
                f"{len(follower.samples['q'])} follower samples, expert success "
                f"{successes / (i + 1):.0%} ({time.monotonic() - t0:.0f} s)")
    pdata = {k: np.stack(v) for k, v in planner.items()}
    fdata = {k: np.stack(v) for k, v in follower.samples.items()}
    fdata["episode"] = np.asarray(follower_episode, dtype=np.int32)
    stats = {"episodes": episodes, "expert_success_rate": successes / max(1, episodes),
             "planner_samples": len(pdata["q"]), "follower_samples": len(fdata["q"]),
             "seconds": round(time.monotonic() - t0, 1)}
    return pdata, fdata, stats


def robot_spec(robot: RobotDescription | None) -> dict[str, Any]:
    """What of the robot a dataset's cache key holds; duet's arm adds nothing (its cached
    data keeps the keys it had before robots were described)."""
    if robot is None or robot.mjcf == ARM_MJCF:
        return {}
    return {"robot": [robot.name, str(robot.mjcf), list(robot.joints)]}


def dataset_key(episodes: int, seed: int, settings: LoopSettings,
                two_step_fraction: float, robot: RobotDescription | None = None) -> str:
    spec = {"v": DATA_VERSION, "episodes": episodes, "seed": seed,
            "two_step_fraction": two_step_fraction, "physics_hz": settings.physics_hz,
            "follower_hz": settings.follower_hz, "planner_hz": settings.planner_hz,
            "dt_s": settings.dt_s, "strategy": settings.core.strategy,
            "blend_s": settings.core.blend_s, "residual_max": settings.core.residual_max,
            **robot_spec(robot)}
    return _spec_key(spec)


def _spec_key(spec: dict[str, Any]) -> str:
    """Cache key of a dataset: a short hash of what generated it."""
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def load_or_generate(data_dir: Path, episodes: int, seed: int, settings: LoopSettings,
                     two_step_fraction: float = 0.5, log: Log = print,
                     cfg: DuetConfig | None = None
                     ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, Any]]:
    """Cached datasets of the robot `cfg` describes (default duet's arm):
    data_dir/{planner,follower}-KEY.npz (+ KEY.json with stats/hashes)."""
    robot = describe(cfg) if cfg is not None else None
    key = dataset_key(episodes, seed, settings, two_step_fraction, robot)
    p_path = data_dir / f"planner-{key}.npz"
    f_path = data_dir / f"follower-{key}.npz"
    s_path = data_dir / f"dataset-{key}.json"
    if p_path.is_file() and f_path.is_file() and s_path.is_file():
        log(f"data: cached {p_path.name}, {f_path.name}")
        with np.load(p_path) as p, np.load(f_path) as f:
            return dict(p), dict(f), json.loads(s_path.read_text())
    log(f"data: generating {episodes} episodes (seed {seed}) -> {data_dir}")
    pdata, fdata, stats = generate(episodes, seed, settings, two_step_fraction, log, robot)
    data_dir.mkdir(parents=True, exist_ok=True)
    # images are noise to zlib (it saves little and costs seconds): plain savez
    np.savez(p_path, **dict[str, Any](pdata))
    np.savez(f_path, **dict[str, Any](fdata))
    stats["planner_sha256"] = sha256_file(p_path)
    stats["follower_sha256"] = sha256_file(f_path)
    stats["key"] = key
    s_path.write_text(json.dumps(stats, indent=1) + "\n")
    return pdata, fdata, stats


def load_or_generate_synth(data_dir: Path, scenes: int, walks: int, seed: int,
                           two_step_fraction: float, workers: int, log: Log = print,
                           cfg: DuetConfig | None = None
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Cached kinematic-walk data (`policy.synth`) of the robot `cfg` describes: rendered
    scene samples from `scenes` walks and image-free action samples from `walks` walks, seeds
    disjoint from rollouts."""
    from policy.synth import action_samples, parallel, scene_samples

    spec = {"v": DATA_VERSION, "scenes": scenes, "walks": walks, "seed": seed,
            "two_step_fraction": two_step_fraction,
            **robot_spec(describe(cfg) if cfg is not None else None)}
    key = _spec_key(spec)
    s_path, a_path = data_dir / f"scenes-{key}.npz", data_dir / f"actions-{key}.npz"
    if s_path.is_file() and a_path.is_file():
        log(f"data: cached {s_path.name}, {a_path.name}")
        with np.load(s_path) as s, np.load(a_path) as a:
            return dict(s), dict(a)
    t0 = time.monotonic()
    base = 500_000_000 + seed * 1_000_003  # below the eval seeds, away from rollout seeds
    scene_seeds = [base + i for i in range(scenes)]
    walk_seeds = [base + scenes + i for i in range(walks)]
    sdata = parallel(scene_samples, scene_seeds, workers, two_step_fraction, cfg)
    log(f"  data: {len(sdata['q'])} rendered scene samples ({time.monotonic() - t0:.0f} s)")
    adata = parallel(action_samples, walk_seeds, workers, two_step_fraction, cfg)
    log(f"  data: {len(adata['q'])} action samples ({time.monotonic() - t0:.0f} s)")
    data_dir.mkdir(parents=True, exist_ok=True)
    np.savez(s_path, **dict[str, Any](sdata))
    np.savez(a_path, **dict[str, Any](adata))
    return sdata, adata
