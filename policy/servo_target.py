"""The follower's training target: the residual that makes a position servo track a reference.

The sim's servos run tau = kp (goal - q) - kd dq on board (sim/world.py). Commanding
goal = r(t) leaves a lag of about (kd/kp) v (velocity lag) plus gravity sag. The command that
does track is found by inverting both layers of the known dynamics:

1. desired acceleration = reference acceleration + PD on the state error
   a* = a_r + w^2 (r - q) + 2 zeta w (v_r - dq)  (critically damped, w = OMEGA)
2. torque for it from MuJoCo inverse dynamics (mass matrix, gravity, Coriolis, passive
   damping, friction as the model has them): tau* = ID(q, dq, a*)
3. position command the servo turns into tau*: goal = q + (tau* + kd dq) / kp

The residual target is goal - r(t), clipped to +-residual_max (the runtime clips the same).
`from_window` takes r, v_r, a_r at the command time from a least-squares quadratic through
the first points of the look-ahead window, so the target is a function of exactly what the
follower sees at run time (window, q, dq) and is learnable without hidden state.
"""

from __future__ import annotations

import mujoco
import numpy as np

from sim.robot import RobotDescription, default_robot

OMEGA = 20.0  # rad/s: bandwidth of the state-error correction
ZETA = 1.0


class ServoResidualTarget:
    """Inverse-dynamics residual for a sim robot (`SimWorld.model`, position-mode gains;
    default: duet's arm)."""

    def __init__(self, model: mujoco.MjModel, kp: np.ndarray, kd: np.ndarray,
                 residual_max: float, robot: RobotDescription | None = None) -> None:
        self.model = model
        self.data = mujoco.MjData(model)
        self.kp = np.asarray(kp, dtype=float)
        self.kd = np.asarray(kd, dtype=float)
        if not (self.kp > 0).all():
            raise ValueError("the servo target needs every joint's position gain kp > 0")
        self.residual_max = residual_max
        self.robot = robot if robot is not None else default_robot()

    def __call__(self, r: np.ndarray, v_r: np.ndarray, a_r: np.ndarray, q: np.ndarray,
                 dq: np.ndarray) -> np.ndarray:
        """Residual [n] for reference (r, v_r, a_r) at the command time, state (q, dq)."""
        a_des = a_r + OMEGA * OMEGA * (r - q) + 2.0 * ZETA * OMEGA * (v_r - dq)
        d, robot = self.data, self.robot
        d.qpos[robot.qadr] = q
        d.qvel[robot.dofadr] = dq
        d.qacc[robot.dofadr] = a_des
        # joints slaved by an equality constraint (a mirrored finger) follow their driver
        for c in robot.couplings:
            d.qpos[c.qadr] = c.c0 + c.c1 * q[c.source]
            d.qvel[c.dofadr] = c.c1 * dq[c.source]
            d.qacc[c.dofadr] = c.c1 * a_des[c.source]
        mujoco.mj_inverse(self.model, d)
        tau = d.qfrc_inverse[robot.dofadr].copy()
        for c in robot.couplings:  # the driving motor drives the slaved joint too
            tau[c.source] += c.c1 * d.qfrc_inverse[c.dofadr]
        goal = q + (tau + self.kd * dq) / self.kp
        return np.clip(goal - r, -self.residual_max, self.residual_max)

    def from_window(self, ref: np.ndarray, q: np.ndarray, dq: np.ndarray, t_cmd: float,
                    spacing: float = 0.02, fit_points: int = 4) -> np.ndarray:
        """Residual [n] for the window ref [L,n] at t + (i+1)·spacing, command time t + t_cmd."""
        tau = (np.arange(fit_points) + 1.0) * spacing - t_cmd
        basis = np.stack([np.ones_like(tau), tau, tau * tau], axis=1)  # [P, 3]
        coef = np.linalg.lstsq(basis, ref[:fit_points], rcond=None)[0]  # [3, 6]: c0 + c1 τ + c2 τ²
        return self(coef[0], coef[1], 2.0 * coef[2], q, dq)
