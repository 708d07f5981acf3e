"""The simulated arm: MuJoCo physics driven by emulated servos through `Actuators`.

`SimWorld` owns the model and the live `MjData`. Each physics step turns the servos'
commands (written into `Actuators` by a device emulator, or directly in lockstep use) into
joint torques with the servo's own control law, saturates them at the stall torque, steps
MuJoCo and writes the measured state back. `ArmKinematics` is the part data generation and
the expert need without any physics: forward kinematics and inverse kinematics of the
fingertip on a private `MjData`, so it never disturbs a running simulation.

Servo model (position mode, what a Dynamixel X-series does on board): tau = kp (goal - q)
- kd dq, no gravity feed-forward, saturated at the stall torque. The factory gains are those
of the servos' default Position P Gain (800) through the e-manual's PWM map, with the
damping every voltage-driven motor has from back-EMF (stall torque / no-load speed):
XM540-W270 (10.6 N·m, 30 rpm) on base, shoulder and elbow, XM430-W350 (4.1 N·m, 46 rpm) on
the wrist and gripper. That is stiff and stable but leaves a visible tracking lag (kd/kp of
45-70 ms) and a gravity sag (up to ~0.06 rad on the shoulder at full reach) that the
follower's residual can learn to remove. A bus that writes its own kp (> 0) overrides them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the import
import mujoco

from sim.actuators import HW_OVERLOAD, MODE_MIT, Actuators

MODEL_PATH = Path(__file__).parent / "assets" / "arm.xml"
JOINTS = ("base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper")
BLOCK_COLOURS = ("red", "green", "blue", "yellow")
GREY_RGBA = np.array([0.32, 0.32, 0.33, 1.0])
PARKED = np.array([0.0, 3.0, -1.0])  # off the table and out of view
BLOCK_HALF = 0.025  # m, half the edge of the block cubes in arm.xml

# A comfortable start: fingertip 0.24 m in front of the base, 0.2 m above the table,
# pointing down, gripper nearly closed (the fingers form the pointer).
HOME_Q = np.array([0.0, 0.0, 1.82, 1.33, 0.0, 0.1])

# Factory position-mode gains (N·m/rad, N·m·s/rad), per joint (module docstring):
# kp = 800/128 * 4096/(2π) * stall/885, kd = stall / no-load speed.
# The servo model behind each joint; the emulated servos report and behave as these.
SERVO_MODELS = ("XM540-W270",) * 3 + ("XM430-W350",) * 3
POSITION_KP = np.array([48.8, 48.8, 48.8, 18.9, 18.9, 18.9])
POSITION_KD = np.array([3.37, 3.37, 3.37, 0.85, 0.85, 0.85])

OVERLOAD_S = 1.5  # continuous saturation before the servo trips (Dynamixel overload)


def _load_model(physics_hz: float) -> mujoco.MjModel:
    if not physics_hz > 0:
        raise ValueError(f"physics_hz must be positive, got {physics_hz}")
    model = mujoco.MjModel.from_xml_path(str(MODEL_PATH))
    model.opt.timestep = 1.0 / physics_hz
    return model


class ArmKinematics:
    """Fingertip FK/IK on a private MjData. Safe to use beside a stepping `SimWorld`
    (the model is only read)."""

    def __init__(self, model: mujoco.MjModel | None = None) -> None:
        self.model = model if model is not None else _load_model(1000.0)
        self._data = mujoco.MjData(self.model)
        self._site = self.model.site("fingertip").id
        self._qadr = np.array([self.model.joint(j).qposadr[0] for j in JOINTS])
        self._dofadr = np.array([self.model.joint(j).dofadr[0] for j in JOINTS[:5]])
        self.q_min = np.array([self.model.joint(j).range[0] for j in JOINTS])
        self.q_max = np.array([self.model.joint(j).range[1] for j in JOINTS])
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))
        self._ik_cache: dict[tuple[float, float, float], np.ndarray] = {}

    def _set(self, q: np.ndarray) -> None:
        self._data.qpos[self._qadr] = q
        mujoco.mj_kinematics(self.model, self._data)

    def fingertip(self, q: np.ndarray) -> np.ndarray:
        """Fingertip position [3] (m, world frame) at joint position q [6]."""
        self._set(np.asarray(q, dtype=float))
        return self._data.site_xpos[self._site].copy()

    def ik(self, target_xyz: np.ndarray, q_init: np.ndarray, iters: int = 200,
           tol: float = 1e-4) -> np.ndarray:
        """Joint position [6] putting the fingertip at `target_xyz` with the tool axis
        pointing straight down (damped least squares). Wrist roll and gripper keep their
        values from `q_init`; the result is clipped to the joint ranges."""
        target = np.asarray(target_xyz, dtype=float)
        if target.shape != (3,) or not np.isfinite(target).all():
            raise ValueError(f"ik target must be a finite xyz, got {target_xyz!r}")
        q = np.clip(np.asarray(q_init, dtype=float).copy(), self.q_min, self.q_max)
        down = np.array([0.0, 0.0, -1.0])
        w_rot = 0.2  # m per rad: an orientation error of 0.05 rad weighs like 1 cm
        lam2 = 1e-4
        for _ in range(iters):
            self._set(q)
            e_pos = target - self._data.site_xpos[self._site]
            z_axis = self._data.site_xmat[self._site].reshape(3, 3)[:, 2]
            e_rot = np.cross(z_axis, down)
            if np.linalg.norm(e_pos) < tol and np.linalg.norm(e_rot) < 1e-3:
                break
            mujoco.mj_comPos(self.model, self._data)
            mujoco.mj_jacSite(self.model, self._data, self._jacp, self._jacr, self._site)
            jac = np.vstack((self._jacp[:, self._dofadr], w_rot * self._jacr[:, self._dofadr]))
            err = np.concatenate((e_pos, w_rot * e_rot))
            step = np.linalg.solve(jac.T @ jac + lam2 * np.eye(5), jac.T @ err)
            # bound the step so the linearisation holds far from the solution
            scale = min(1.0, 0.3 / max(float(np.abs(step).max()), 1e-12))
            q[:5] = np.clip(q[:5] + scale * step, self.q_min[:5], self.q_max[:5])
        return q

    def seed_for(self, target_xyz: np.ndarray) -> np.ndarray:
        """An elbow-up, pointing-down start for IK towards a target on the table."""
        seed = HOME_Q.copy()
        seed[0] = math.atan2(float(target_xyz[1]), float(target_xyz[0]))
        seed[4] = 0.0
        return seed

    def ik_cached(self, target_xyz: np.ndarray) -> np.ndarray:
        """IK from `seed_for(target)`: a pure function of the target, memoised (episode
        targets repeat at every re-plan). Returns a copy."""
        key = (round(float(target_xyz[0]), 5), round(float(target_xyz[1]), 5),
               round(float(target_xyz[2]), 5))
        q = self._ik_cache.get(key)
        if q is None:
            if len(self._ik_cache) > 4096:
                self._ik_cache.clear()
            q = self.ik(np.array(key), self.seed_for(np.array(key)))
            self._ik_cache[key] = q
        return q.copy()


class SimWorld:
    """MuJoCo arm + blocks, stepped from the commands in `actuators`.

    Joint order is `JOINTS` (the config's order). Thread use: `step` takes the actuator lock
    only around the servo law; `snapshot` copies the state for a renderer thread.
    """

    def __init__(self, seed: int = 0, physics_hz: float = 1000.0,
                 actuators: Actuators | None = None) -> None:
        self.model = _load_model(physics_hz)
        self.data = mujoco.MjData(self.model)
        self.rng = np.random.default_rng(seed)
        self.dt = float(self.model.opt.timestep)
        self.kin = ArmKinematics(self.model)
        self.actuators = actuators if actuators is not None else Actuators(len(JOINTS))
        self.position_kp = POSITION_KP.copy()
        self.position_kd = POSITION_KD.copy()
        self.stall_torque = self.model.actuator_ctrlrange[:, 1].copy()
        self.q_min, self.q_max = self.kin.q_min, self.kin.q_max
        qadr = [self.model.joint(j).qposadr[0] for j in JOINTS]
        dofadr = [self.model.joint(j).dofadr[0] for j in JOINTS]
        # The actuated joints are the first six coordinates: views, not gathers, per step.
        if qadr != list(range(6)) or dofadr != list(range(6)):
            raise RuntimeError("arm.xml: the actuated joints must be the first six coordinates")
        self._q = self.data.qpos[:6]
        self._dq = self.data.qvel[:6]
        self._mirror_qadr = self.model.joint("gripper_mirror").qposadr[0]
        self._site = self.model.site("fingertip").id
        self._block_body = {c: self.model.body(f"block_{c}").mocapid[0] for c in BLOCK_COLOURS}
        self._block_geom = {c: self.model.geom(f"block_{c}").id for c in BLOCK_COLOURS}
        self._block_rgba = {c: self.model.geom_rgba[g].copy() for c, g in self._block_geom.items()}
        if not np.allclose(self.model.geom_size[list(self._block_geom.values())], BLOCK_HALF):
            raise RuntimeError(f"arm.xml: blocks must be cubes of half-edge {BLOCK_HALF} m")
        self._saturated_s = np.zeros(len(JOINTS))
        self._tau = np.zeros(len(JOINTS))
        self._cameras: dict[tuple[str, int, int], object] = {}  # SceneCameras, made on use
        self.set_joint_state(HOME_Q)

    # -- state ---------------------------------------------------------------------------
    @property
    def time(self) -> float:
        """Simulated time (s) since the world was created."""
        return float(self.data.time)

    def q(self) -> np.ndarray:
        return self._q.copy()

    def dq(self) -> np.ndarray:
        return self._dq.copy()

    def set_joint_state(self, q: np.ndarray) -> None:
        """Teleport the arm to q [6] at rest; the servos' goals follow (no jump on enable)."""
        q = np.asarray(q, dtype=float)
        if q.shape != (len(JOINTS),) or not np.isfinite(q).all():
            raise ValueError(f"joint state must be {len(JOINTS)} finite values, got {q!r}")
        q = np.clip(q, self.q_min, self.q_max)
        self._q[:] = q
        self.data.qpos[self._mirror_qadr] = q[5]
        self.data.qvel[:] = 0.0
        mujoco.mj_forward(self.model, self.data)
        a = self.actuators
        zeros = np.zeros_like(q)
        with a.lock:
            a.q[:] = q
            a.dq[:] = 0.0
            a.goal_q[:] = q
            a.tau[:] = 0.0
            a.publish_present(q, zeros, zeros)
        self._saturated_s[:] = 0.0

    def fingertip(self) -> np.ndarray:
        """Fingertip position [3]; from the kinematics of the last step (<= 1 step old)."""
        return self.data.site_xpos[self._site].copy()

    def ik(self, target_xyz: np.ndarray, q_init: np.ndarray | None = None) -> np.ndarray:
        """See `ArmKinematics.ik`; q_init defaults to the current joint position."""
        return self.kin.ik(target_xyz, self.q() if q_init is None else q_init)

    # -- blocks --------------------------------------------------------------------------
    def place_blocks(self, centres: dict[str, np.ndarray]) -> None:
        """Move blocks to their centre positions and restore their colours. Blocks not
        named are parked (`PARKED`)."""
        for colour in BLOCK_COLOURS:
            mocap = self._block_body[colour]
            self.data.mocap_pos[mocap] = centres.get(colour, PARKED)
            self.model.geom_rgba[self._block_geom[colour]] = self._block_rgba[colour]

    def set_block_grey(self, colour: str) -> None:
        self.model.geom_rgba[self._block_geom[colour]] = GREY_RGBA

    def block_top(self, colour: str) -> np.ndarray:
        """Top-face centre of a block [3]."""
        return self.data.mocap_pos[self._block_body[colour]] + (0.0, 0.0, BLOCK_HALF)

    # -- physics -------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        """Advance n physics steps: servo law -> saturation -> overload -> mj_step."""
        a = self.actuators
        q, dq, tau = self._q, self._dq, self._tau
        for _ in range(n):
            with a.lock:
                mit = a.mode == MODE_MIT
                own = a.kp > 0.0  # a bus wrote gains; otherwise the factory gains
                kp = np.where(mit | own, a.kp, self.position_kp)
                kd = np.where(mit | own, a.kd, self.position_kd)
                np.multiply(kp, a.goal_q - q, out=tau)
                tau += kd * (np.where(mit, a.goal_dq, 0.0) - dq)
                tau += np.where(mit, a.tau_ff, 0.0)
                live = a.torque_enabled & (a.hw_error == 0)
                tau *= live
                saturated = live & (np.abs(tau) >= self.stall_torque)
                np.clip(tau, -self.stall_torque, self.stall_torque, out=tau)
                self._saturated_s += self.dt
                self._saturated_s *= saturated
                if (self._saturated_s > OVERLOAD_S).any():
                    trip = self._saturated_s > OVERLOAD_S
                    a.hw_error[trip] |= HW_OVERLOAD
                    a.torque_enabled[trip] = False
                    self._saturated_s[trip] = 0.0
                self.data.ctrl[:] = tau
            # Outside the lock: the servos' replies never wait for a physics step (mj_step
            # releases the GIL, and taking it back can wait behind the camera thread).
            mujoco.mj_step(self.model, self.data)
            a.publish_present(q, dq, tau)  # what the servos answer with, lock-free
            with a.lock:
                a.q[:] = q
                a.dq[:] = dq
                a.tau[:] = tau

    # -- rendering -----------------------------------------------------------------------
    def snapshot(self, dst: mujoco.MjData) -> None:
        """Copy what a renderer needs (poses, blocks, time) into another MjData."""
        # The lock orders this against block moves and the servo state; a step running
        # meanwhile can make poses up to one physics step (1 ms) apart, invisible in a frame.
        with self.actuators.lock:
            dst.qpos[:] = self.data.qpos
            dst.mocap_pos[:] = self.data.mocap_pos
            dst.time = self.data.time

    def render(self, camera: str = "scene", width: int = 96, height: int = 96) -> np.ndarray:
        """A camera's view of the current state: uint8 [height, width, 3] RGB."""
        from sim.camera import SceneCamera

        key = (camera, width, height)
        renderer = self._cameras.get(key)
        if renderer is None:
            renderer = self._cameras[key] = SceneCamera(self.model, width, height, camera)
        assert isinstance(renderer, SceneCamera)
        return renderer.render(self.data)
