"""Touch-the-block episodes: layout, instruction, progress and outcome.

An episode places all four blocks (the ones not named are distractors) and asks for one
target ("touch the red block") or two in order ("touch the blue block, then the green one").
A target counts as touched when the fingertip comes within `TOUCH_RADIUS` of its top-face
centre while it is the next one in order; it then turns grey in the render, so a planner
that sees only the current image can tell what is left. All targets in order = success;
running out of time = failure. Everything is a deterministic function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from runtime.config import Workspace
from sim.robot import BLOCK_COLOURS, BLOCK_HALF
from sim.world import SimWorld

TOUCH_RADIUS = 0.03  # m, fingertip to the top-face centre
# Where blocks go: comfortably inside the reach, in front of the base (the robot's
# sim.robot.workspace; the default is duet's arm's).
ARM_WORKSPACE = Workspace()
MIN_SEPARATION = 0.09  # m between block centres

# How a two-target instruction names its order: "touch the A block, then the B one" (what the
# reference was trained on) or "touch the B block after the A one" (the same task in words
# it never saw: A still comes first).
PHRASINGS = ("then", "after")

RUNNING = "running"
SUCCESS = "success"
TIMEOUT = "timeout"


class Episode:
    """One episode's layout and instruction, drawn from `seed`.

    blocks: colour -> block centre xyz [3] (all four colours);
    order: the target colours, in the order they must be touched;
    targets: colour -> top-face centre xyz [3] of each target;
    instruction: the English instruction.
    """

    def __init__(self, seed: int, two_step_fraction: float = 0.5,
                 phrasing: str = "then", workspace: Workspace = ARM_WORKSPACE) -> None:
        if not 0.0 <= two_step_fraction <= 1.0:
            raise ValueError(f"two_step_fraction must be in [0, 1], got {two_step_fraction}")
        if phrasing not in PHRASINGS:
            raise ValueError(f"phrasing must be one of {PHRASINGS}, got {phrasing!r}")
        self.seed = seed
        rng = np.random.default_rng(seed)
        self.blocks = _place_blocks(rng, workspace)
        n_targets = 2 if rng.random() < two_step_fraction else 1
        picks = rng.permutation(len(BLOCK_COLOURS))[:n_targets]
        self.order: tuple[str, ...] = tuple(BLOCK_COLOURS[i] for i in picks)
        self.targets = {c: self.blocks[c] + np.array([0.0, 0.0, BLOCK_HALF]) for c in self.order}
        if n_targets == 1:
            self.instruction = f"touch the {self.order[0]} block"
        elif phrasing == "after":
            self.instruction = f"touch the {self.order[1]} block after the {self.order[0]} one"
        else:
            self.instruction = f"touch the {self.order[0]} block, then the {self.order[1]} one"

    def __repr__(self) -> str:
        return f"Episode(seed={self.seed}, instruction={self.instruction!r})"


# Draws for one block before the layout starts over: in a small workspace (the SO-101's) the
# first blocks can leave no room for the last, and drawing on would never end.
PLACE_TRIES = 200


def _place_blocks(rng: np.random.Generator, workspace: Workspace) -> dict[str, np.ndarray]:
    centres: list[np.ndarray] = []
    tries = 0
    while len(centres) < len(BLOCK_COLOURS):
        if tries == PLACE_TRIES:
            centres, tries = [], 0
        tries += 1
        r = rng.uniform(*workspace.radius)
        bearing = rng.uniform(*workspace.bearing)
        p = np.array([r * np.cos(bearing), r * np.sin(bearing), BLOCK_HALF])
        if all(np.linalg.norm(p[:2] - c[:2]) >= MIN_SEPARATION for c in centres):
            centres.append(p)
            tries = 0
    return dict(zip(BLOCK_COLOURS, centres, strict=True))


@dataclass
class TaskTracker:
    """Progress of one episode in a world. `start` places the blocks; `update` (call it a
    few hundred times a second or at every lockstep step) returns the status."""

    episode: Episode
    timeout_s: float = 12.0
    touched: list[str] = field(default_factory=list)
    status: str = RUNNING
    t_start: float = 0.0
    t_end: float | None = None

    def start(self, world: SimWorld, t: float) -> None:
        world.place_blocks(self.episode.blocks)
        self.touched.clear()
        self.status = RUNNING
        self.t_start = t
        self.t_end = None

    def remaining(self) -> np.ndarray:
        """Top-face centres [k, 3] of the targets not yet touched, in order (the expert's
        view of the episode)."""
        left = self.episode.order[len(self.touched):]
        if not left:
            return np.zeros((0, 3))
        return np.stack([self.episode.targets[c] for c in left])

    def update(self, world: SimWorld, t: float) -> str:
        if self.status != RUNNING:
            return self.status
        order = self.episode.order
        nxt = order[len(self.touched)]
        if np.linalg.norm(world.fingertip() - self.episode.targets[nxt]) <= TOUCH_RADIUS:
            self.touched.append(nxt)
            world.set_block_grey(nxt)
            if len(self.touched) == len(order):
                self.status = SUCCESS
                self.t_end = t
                return self.status
        if t - self.t_start >= self.timeout_s:
            self.status = TIMEOUT
            self.t_end = t
        return self.status

    @property
    def duration_s(self) -> float:
        return (self.t_end if self.t_end is not None else self.t_start) - self.t_start


def episode_seed(base_seed: int, index: int) -> int:
    """Seed of the index-th episode of a run seeded `base_seed` (distinct per index)."""
    return base_seed * 1_000_003 + index
