"""The scripted expert as the robot's teleoperator: a plan source for the planner shell
(runtime/planner/shell.py) whose plans come from `sim.expert.expert_chunk` instead of a
bundle's model, so demonstrations travel the robot's real path (plan socket, follower,
servos on the wire) and the flight recorder records them like any other episode.

The operator knows what a person at the robot would: the instruction the sim announces and
where the blocks are (the episode's layout, a deterministic function of the sim's seed and
the announced episode index, sim/task.py). Which targets are done it sees from the arm
itself: the fingertip (forward kinematics of the measured joints) within the sim's touch
radius of the next target.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from runtime.config import DuetConfig, SimConfig
from runtime.model.bundle import Bundle
from runtime.planner.shell import PlannerShell, PlanSource
from sim.expert import expert_chunk
from sim.robot import describe
from sim.task import TOUCH_RADIUS, Episode, episode_seed
from sim.world import ArmKinematics


class ExpertSource(PlanSource):
    def __init__(self, cfg: DuetConfig, bundle: Bundle) -> None:
        actions = bundle.contract.planner.actions
        self.horizon, self.dt_s = actions.horizon, actions.dt_s
        self.sim = cfg.sim or SimConfig()
        self.kin = ArmKinematics(describe(cfg))
        self.velocity_max = np.asarray(cfg.robot.limits.velocity_max, dtype=float)
        self.layout: Episode | None = None
        self.touched = 0

    def camera_names(self) -> Sequence[str]:
        return ()  # the expert needs no images

    def check_instruction(self, text: str) -> None:
        """The operator reads any instruction."""

    def _targets_left(self, q: np.ndarray, index: object) -> np.ndarray:
        if not isinstance(index, int):
            return np.zeros((0, 3))
        if self.layout is None or self.layout.seed != episode_seed(self.sim.seed, index):
            self.layout = Episode(episode_seed(self.sim.seed, index),
                                  self.sim.two_step_fraction, self.sim.phrasing,
                                  self.sim.robot.workspace)
            self.touched = 0
        order = self.layout.order
        if self.touched < len(order):
            target = self.layout.targets[order[self.touched]]
            if np.linalg.norm(self.kin.fingertip(q) - target) <= TOUCH_RADIUS:
                self.touched += 1
        return np.array([self.layout.targets[c] for c in order[self.touched:]]).reshape(-1, 3)

    def cycle(self, shell: PlannerShell) -> None:
        got = shell.observe()
        if got is None:
            return
        _, t_obs = got
        q = shell.history.latest("q").astype(float)
        chunk = expert_chunk(self.kin, self._targets_left(q, shell.episode), q, self.horizon,
                             self.dt_s, self.velocity_max)
        shell.publish(chunk, self.dt_s, t_obs, shell.episode)

