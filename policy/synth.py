"""Cheap planner data without physics: kinematic walks of the expert through random scenes.

The expert's chunk is a pure function of (q, targets left), so any joint state can be
labelled. A *walk* starts the arm somewhere plausible (near home before the first target;
near the first target's touch pose once it is touched), follows the expert's own chunks
kinematically with noise, and so visits the states closed-loop control visits (cruising,
hovering over a block, descending, recovering from an offset) at a fraction of a rollout's
cost. Two kinds of samples come out:

- action samples (no image): (q, next target xy) -> chunk, tens of thousands per second,
  for the planner's action MLP;
- scene samples: the rendered image at a few states of each walk with the full labels
  (tokens, q, chunk, every block's table xy, which blocks are still coloured, the target
  order and the next target's xy), for the perception and the end-to-end loss.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

import numpy as np

from runtime.config import DuetConfig
from runtime.model.tokenizer import Tokenizer
from sim.expert import TOUCH_HEIGHT, expert_chunk
from sim.robot import BLOCK_COLOURS, RobotDescription, default_robot, describe
from sim.task import Episode
from sim.world import ArmKinematics, SimWorld

HORIZON = 10
DT_S = 0.1
# rad, (base yaw, other arm joints, gripper) as RobotDescription.start_noise takes them
START_NOISE = (0.6, 0.4, 0.05)  # around home, first target
TOUCHED_NOISE = (0.1, 0.1, 0.03)  # around the touch pose
WALK_NOISE = 0.03  # rad per step: executed chunks are never exact
MAX_WALK_STEPS = 30  # x 0.1-0.3 s: long enough to reach and settle on a target


def _walk(kin: ArmKinematics, q0: np.ndarray, remaining: np.ndarray, rng: np.random.Generator,
          steps: int) -> list[np.ndarray]:
    """States visited following the expert's chunks from q0 (each step executes 1-3
    waypoints of the chunk, plus noise)."""
    q = q0.copy()
    states = [q.copy()]
    for _ in range(steps):
        chunk = expert_chunk(kin, remaining, q, horizon=HORIZON, dt=DT_S)
        q = chunk[rng.integers(0, 3)].astype(float) + \
            rng.normal(0.0, WALK_NOISE, len(q)) * rng.uniform(0.0, 1.0)
        q = np.clip(q, kin.q_min, kin.q_max)
        states.append(q.copy())
    return states


def _scene(kin: ArmKinematics, seed: int, two_step_fraction: float
           ) -> tuple[Episode, int, np.ndarray, list[np.ndarray]]:
    """A layout, a phase (targets already touched) and the walk's states."""
    rng = np.random.default_rng(seed)
    robot = kin.robot
    episode = Episode(seed, two_step_fraction, workspace=robot.workspace)
    targets = [episode.targets[c] for c in episode.order]
    touched = int(len(targets) == 2 and rng.random() < 0.4)
    if touched:
        touch_pose = kin.ik_cached(targets[0] + np.array([0.0, 0.0, TOUCH_HEIGHT]))
        if robot.gripper is not None:
            touch_pose[robot.gripper] = robot.home[robot.gripper]
        q0 = touch_pose + rng.uniform(-1.0, 1.0, robot.n) * _noise(robot, TOUCHED_NOISE)
    else:
        q0 = robot.home + rng.uniform(-1.0, 1.0, robot.n) * _noise(robot, START_NOISE)
    q0 = np.clip(q0, kin.q_min, kin.q_max)
    remaining = np.stack(targets[touched:])
    states = _walk(kin, q0, remaining, rng, int(rng.integers(5, MAX_WALK_STEPS + 1)))
    return episode, touched, remaining, states


def _noise(robot: RobotDescription, spec: tuple[float, float, float]) -> np.ndarray:
    return robot.start_noise(spec[1], spec[0], spec[2])


def _robot(cfg: DuetConfig | None) -> RobotDescription:
    return describe(cfg) if cfg is not None else default_robot()


def action_samples(seeds: list[int], two_step_fraction: float,
                   cfg: DuetConfig | None = None) -> dict[str, np.ndarray]:
    """Every state of every walk on the robot `cfg` describes (default duet's arm):
    q [N,n], target_xy [N,2], chunk [N,H,n]."""
    kin = ArmKinematics(_robot(cfg))
    out: dict[str, list[np.ndarray]] = {"q": [], "target_xy": [], "chunk": []}
    for seed in seeds:
        _, _, remaining, states = _scene(kin, seed, two_step_fraction)
        for q in states:
            out["q"].append(q.astype(np.float32))
            out["target_xy"].append(remaining[0, :2].astype(np.float32))
            out["chunk"].append(expert_chunk(kin, remaining, q, HORIZON, DT_S))
    return {k: np.stack(v) for k, v in out.items()}


def scene_labels(episode: Episode, touched: int) -> dict[str, np.ndarray]:
    """Per-image labels of a scene: blocks_xy [C,2], visible [C] (1 = still coloured),
    order [2] (colour index of the first and second target, -1 = none), target_xy [2]."""
    colours = list(BLOCK_COLOURS)
    order = [colours.index(c) for c in episode.order] + [-1] * (2 - len(episode.order))
    visible = np.ones(len(colours), dtype=np.float32)
    for c in episode.order[:touched]:
        visible[colours.index(c)] = 0.0
    nxt = episode.order[min(touched, len(episode.order) - 1)]
    return {"blocks_xy": np.stack([episode.blocks[c][:2] for c in colours]).astype(np.float32),
            "visible": visible, "order": np.asarray(order, dtype=np.int64),
            "target_xy": episode.targets[nxt][:2].astype(np.float32)}


def scene_samples(seeds: list[int], two_step_fraction: float, cfg: DuetConfig | None = None,
                  per_scene: int = 3) -> dict[str, np.ndarray]:
    """`per_scene` rendered states of each walk with every planner label (episode = the
    scene's seed, for splits), on the robot `cfg` describes (default duet's arm)."""
    os.environ.setdefault("MUJOCO_GL", "egl")
    world = SimWorld(seed=0, robot=_robot(cfg))
    kin = world.kin
    tok = Tokenizer()
    out: dict[str, list[np.ndarray]] = {}
    for seed in seeds:
        rng = np.random.default_rng(seed + 1)
        episode, touched, remaining, states = _scene(kin, seed, two_step_fraction)
        world.place_blocks(episode.blocks)
        for c in episode.order[:touched]:
            world.set_block_grey(c)
        labels = scene_labels(episode, touched)
        picks = rng.choice(len(states), size=min(per_scene, len(states)), replace=False)
        for i in sorted(picks.tolist()):
            q = states[i]
            world.set_joint_state(q)
            sample = {"image": world.render(), "tokens": tok.encode(episode.instruction),
                      "episode": np.int64(seed),
                      "q": q.astype(np.float32),
                      "chunk": expert_chunk(kin, remaining, q, HORIZON, DT_S), **labels}
            for k, v in sample.items():
                out.setdefault(k, []).append(v)
    return {k: np.stack(v) for k, v in out.items()}


Samples = dict[str, np.ndarray]


def parallel(fn: Callable[..., Samples], seeds: list[int], workers: int, *args: Any) -> Samples:
    """fn(seed slice, *args) over `workers` processes (spawned: each opens its own GL
    context), concatenated in seed order so the result does not depend on `workers`."""
    if workers <= 1 or len(seeds) < 2 * workers:
        return fn(seeds, *args)
    bounds = np.linspace(0, len(seeds), workers + 1).round().astype(int)
    parts = [seeds[a:b] for a, b in itertools.pairwise(bounds)]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        results = list(pool.map(fn, parts, *[[a] * workers for a in args]))
    return {k: np.concatenate([r[k] for r in results]) for k in results[0]}
