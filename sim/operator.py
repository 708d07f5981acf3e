"""The scripted expert as the robot's teleoperator: a planner process shell
(runtime/planner/process.py `PlannerShell`) whose plans come from `sim.expert.expert_chunk` instead
of a bundle's model, so demonstrations travel the robot's real path (plan socket, follower,
servos on the wire) and the flight recorder records them like any other episode.

The operator knows what a person at the robot would: the instruction the sim announces and
where the blocks are (the episode's layout, a deterministic function of the sim's seed and
the announced episode index, sim/task.py). Which targets are done it sees from the arm
itself: the fingertip (forward kinematics of the measured joints) within the sim's touch
radius of the next target.
"""

from __future__ import annotations

import numpy as np

from runtime.config import DuetConfig, SimConfig
from runtime.model.bundle import Bundle
from runtime.planner.process import PlannerShell
from sim.expert import expert_chunk
from sim.task import TOUCH_RADIUS, Episode, episode_seed
from sim.world import ArmKinematics


class ExpertOperator(PlannerShell):
    def __init__(self, cfg: DuetConfig, bundle: Bundle) -> None:
        super().__init__(cfg, bundle, cameras={})  # the expert needs no images
        actions = bundle.contract.planner.actions
        self.horizon, self.dt_s = actions.horizon, actions.dt_s
        self.sim = cfg.sim or SimConfig()
        self.kin = ArmKinematics()
        self.velocity_max = np.asarray(cfg.robot.limits.velocity_max, dtype=float)
        self.layout: Episode | None = None
        self.touched = 0

    def _check_instruction(self, text: str) -> None:
        """The operator reads any instruction."""

    def _targets_left(self, q: np.ndarray) -> np.ndarray:
        index = self.episode
        if not isinstance(index, int):
            return np.zeros((0, 3))
        if self.layout is None or self.layout.seed != episode_seed(self.sim.seed, index):
            self.layout = Episode(episode_seed(self.sim.seed, index),
                                  self.sim.two_step_fraction, self.sim.phrasing)
            self.touched = 0
        order = self.layout.order
        if self.touched < len(order):
            target = self.layout.targets[order[self.touched]]
            if np.linalg.norm(self.kin.fingertip(q) - target) <= TOUCH_RADIUS:
                self.touched += 1
        return np.array([self.layout.targets[c] for c in order[self.touched:]]).reshape(-1, 3)

    def step(self) -> bool:
        got = self.observe()
        if got is None:
            return False
        _, t_obs = got
        q = self.history.latest("q").astype(float)
        chunk = expert_chunk(self.kin, self._targets_left(q), q, self.horizon, self.dt_s,
                             self.velocity_max)
        self.publish(chunk, self.dt_s, t_obs, self.episode)
        return True
