"""The simulated robot: MuJoCo physics driven by emulated motors through `Actuators`.

`SimWorld` owns the model (built from the robot's description, sim/robot.py) and the live
`MjData`. Each physics step turns the motors' commands (written into `Actuators` by a device
emulator, or directly in lockstep use) into joint torques with the motor's own control law,
saturates them at its torque limit, steps MuJoCo and writes the measured state back.
`ArmKinematics` is the part data generation and the expert need without any physics: forward
kinematics and inverse kinematics of the end-effector site on a private `MjData`, so it never
disturbs a running simulation.

Motor model (per joint, figures from sim/motors.py and the config):
- position mode (what a Dynamixel X or a Feetech STS does on board): tau = kp (goal - q_seen)
  - kd dq, no gravity feed-forward; MIT mode: tau = kp (goal - q_seen) + kd (goal_dq - dq) +
  tau_ff with the gains the bus sent. A bus that writes its own kp (> 0) overrides the
  factory gains. duet's arm: XM540-W270 on base, shoulder and elbow, XM430-W350 on the wrist
  and gripper, Position P Gain 800 through the e-manual's PWM map with the damping of
  back-EMF: stiff and stable, with a visible tracking lag (kd/kp of 45-70 ms) and a gravity
  sag (up to ~0.06 rad on the shoulder at full reach) that the follower's residual can learn
  to remove;
- gear play: the loop sees the joint through a backlash of `backlash` rad (a play operator:
  q_seen follows q only once the joint has taken up the slack), so the joint can drift
  within the dead band unopposed;
- saturation at `torque_max`; saturated longer than `OVERLOAD_S`: an overload error, torque
  off (Dynamixel's overload shutdown);
- temperature (sim/motors.py): copper losses heat the motor; above its limit it latches an
  overheating error and lets go.
"""

from __future__ import annotations

import math
import os
import threading

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the import
import mujoco

from sim.actuators import HW_OVERHEATING, HW_OVERLOAD, MODE_MIT, Actuators
from sim.motors import AMBIENT_C
from sim.robot import BLOCK_COLOURS, BLOCK_HALF, SCENE_PREFIX, RobotDescription, default_robot

GREY_RGBA = np.array([0.32, 0.32, 0.33, 1.0])
PARKED = np.array([0.0, 3.0, -1.0])  # off the table and out of view
OVERLOAD_S = 1.5  # continuous saturation before the servo trips (Dynamixel overload)
# physics steps per temperature update: thermal time constants are minutes, and the step
# (the servos' reply path waits on its lock) stays as short as it was without heat
HEAT_EVERY = 10


class ArmKinematics:
    """End-effector FK/IK on a private MjData. Safe to use beside a stepping `SimWorld`
    (the model is only read)."""

    def __init__(self, robot: RobotDescription | None = None,
                 model: mujoco.MjModel | None = None) -> None:
        self.robot = robot if robot is not None else default_robot()
        self.model = model if model is not None else self.robot.model()
        self._data = mujoco.MjData(self.model)
        self._site = self.model.site(self.robot.end_effector).id
        self._qadr = self.robot.qadr
        self._arm = self.robot.arm
        self._arm_dofs = self.robot.dofadr[self._arm]
        self.q_min, self.q_max = self.robot.q_min, self.robot.q_max
        self._jacp = np.zeros((3, self.model.nv))
        self._jacr = np.zeros((3, self.model.nv))
        self._ik_cache: dict[tuple[float, float, float], np.ndarray] = {}
        tip = self.fingertip(self.robot.home)
        self._home_bearing = math.atan2(float(tip[1]), float(tip[0]))

    def _set(self, q: np.ndarray) -> None:
        self._data.qpos[self._qadr] = q
        for c in self.robot.couplings:
            self._data.qpos[c.qadr] = c.c0 + c.c1 * q[c.source]
        mujoco.mj_kinematics(self.model, self._data)

    def fingertip(self, q: np.ndarray) -> np.ndarray:
        """End-effector site position [3] (m, world frame) at joint position q [n]."""
        self._set(np.asarray(q, dtype=float))
        return self._data.site_xpos[self._site].copy()

    def ik(self, target_xyz: np.ndarray, q_init: np.ndarray, iters: int = 200,
           tol: float = 1e-4) -> np.ndarray:
        """Joint position [n] putting the end effector at `target_xyz` (damped least squares
        on MuJoCo's site Jacobian), with its z axis pointing straight down when the robot's
        `tool_down` says so. The gripper keeps its value from `q_init`; the result is clipped
        to the joint ranges."""
        target = np.asarray(target_xyz, dtype=float)
        if target.shape != (3,) or not np.isfinite(target).all():
            raise ValueError(f"ik target must be a finite xyz, got {target_xyz!r}")
        q = np.clip(np.asarray(q_init, dtype=float).copy(), self.q_min, self.q_max)
        arm, lo, hi = self._arm, self.q_min[self._arm], self.q_max[self._arm]
        down = np.array([0.0, 0.0, -1.0])
        w_rot = 0.2  # m per rad: an orientation error of 0.05 rad weighs like 1 cm
        lam2 = 1e-4
        tool_down = self.robot.tool_down
        for _ in range(iters):
            self._set(q)
            e_pos = target - self._data.site_xpos[self._site]
            z_axis = self._data.site_xmat[self._site].reshape(3, 3)[:, 2]
            e_rot = np.cross(z_axis, down)
            if np.linalg.norm(e_pos) < tol and (not tool_down or np.linalg.norm(e_rot) < 1e-3):
                break
            mujoco.mj_comPos(self.model, self._data)
            mujoco.mj_jacSite(self.model, self._data, self._jacp, self._jacr, self._site)
            if tool_down:
                jac = np.vstack((self._jacp[:, self._arm_dofs],
                                 w_rot * self._jacr[:, self._arm_dofs]))
                err = np.concatenate((e_pos, w_rot * e_rot))
            else:
                jac, err = self._jacp[:, self._arm_dofs], e_pos
            step = np.linalg.solve(jac.T @ jac + lam2 * np.eye(len(arm)), jac.T @ err)
            # bound the step so the linearisation holds far from the solution
            scale = min(1.0, 0.3 / max(float(np.abs(step).max()), 1e-12))
            q[arm] = np.clip(q[arm] + scale * step, lo, hi)
        return q

    def seed_for(self, target_xyz: np.ndarray) -> np.ndarray:
        """IK start towards a target on the table: the home pose, its base yaw (if the robot
        has one) turned towards the target."""
        seed = self.robot.home.copy()
        yaw = self.robot.yaw
        if yaw is not None:
            bearing = math.atan2(float(target_xyz[1]), float(target_xyz[0]))
            seed[yaw] += bearing - self._home_bearing
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
    """MuJoCo robot + task blocks, stepped from the commands in `actuators`.

    Joint order is the robot's (`robot.joints`, the config's). Thread use: `step` takes the
    actuator lock only around the motor law; `snapshot` copies the state for a renderer thread
    under a scene lock of its own (a renderer preempted there must not hold up the servos).
    """

    def __init__(self, seed: int = 0, physics_hz: float = 1000.0,
                 actuators: Actuators | None = None,
                 robot: RobotDescription | None = None) -> None:
        self.robot = robot if robot is not None else default_robot()
        self.model = self.robot.model(physics_hz)
        self.data = mujoco.MjData(self.model)
        self.rng = np.random.default_rng(seed)
        self.dt = float(self.model.opt.timestep)
        self.kin = ArmKinematics(self.robot, self.model)
        self._scene_lock = threading.Lock()  # teleports and block moves vs `snapshot`
        n = self.robot.n
        self.actuators = actuators if actuators is not None else Actuators(n)
        if self.actuators.n != n:
            raise ValueError(f"{self.actuators.n} actuators for a robot of {n} joints")
        motors = self.robot.motors
        self.position_kp = motors.kp.copy()
        self.position_kd = motors.kd.copy()
        self.stall_torque = motors.torque_max.copy()
        self._half_play = motors.backlash / 2
        self._play = bool((motors.backlash > 0).any())
        self._heat_rate = HEAT_EVERY * self.dt / motors.heat_tau_s  # per update
        self._heat_rise = motors.heat_rise_c
        self._temperature_limit = motors.temperature_limit_c
        self.q_min, self.q_max = self.kin.q_min, self.kin.q_max
        qadr, dofadr = self.robot.qadr, self.robot.dofadr
        # Contiguous joints (the usual MJCF): views, not gathers, per step.
        self._qsel: slice | np.ndarray = qadr
        self._vsel: slice | np.ndarray = dofadr
        if np.array_equal(qadr, np.arange(n) + qadr[0]):
            self._qsel = slice(int(qadr[0]), int(qadr[0]) + n)
        if np.array_equal(dofadr, np.arange(n) + dofadr[0]):
            self._vsel = slice(int(dofadr[0]), int(dofadr[0]) + n)
        self._site = self.model.site(self.robot.end_effector).id
        self._block_body = {c: self.model.body(f"{SCENE_PREFIX}block_{c}").mocapid[0]
                            for c in BLOCK_COLOURS}
        self._block_geom = {c: self.model.geom(f"{SCENE_PREFIX}block_{c}").id
                            for c in BLOCK_COLOURS}
        self._block_rgba = {c: self.model.geom_rgba[g].copy() for c, g in self._block_geom.items()}
        if not np.allclose(self.model.geom_size[list(self._block_geom.values())], BLOCK_HALF):
            raise RuntimeError(f"task scene: blocks must be cubes of half-edge {BLOCK_HALF} m")
        self._saturated_s = np.zeros(n)
        self._tau = np.zeros(n)
        self._seen = np.zeros(n)  # each motor's view of its joint, through the gear play
        self._temperature = np.full(n, AMBIENT_C)
        self._steps = 0
        self._cameras: dict[tuple[str, int, int], object] = {}  # SceneCameras, made on use
        self.set_joint_state(self.robot.home)

    # -- state ---------------------------------------------------------------------------
    @property
    def time(self) -> float:
        """Simulated time (s) since the world was created."""
        return float(self.data.time)

    def q(self) -> np.ndarray:
        return np.array(self.data.qpos[self._qsel])

    def dq(self) -> np.ndarray:
        return np.array(self.data.qvel[self._vsel])

    def set_joint_state(self, q: np.ndarray) -> None:
        """Teleport the robot to q [n] at rest; the motors' goals follow (no jump on
        enable)."""
        q = np.asarray(q, dtype=float)
        n = self.robot.n
        if q.shape != (n,) or not np.isfinite(q).all():
            raise ValueError(f"joint state must be {n} finite values, got {q!r}")
        q = np.clip(q, self.q_min, self.q_max)
        with self._scene_lock:
            self.data.qpos[self._qsel] = q
            for c in self.robot.couplings:
                self.data.qpos[c.qadr] = c.c0 + c.c1 * q[c.source]
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
        self._seen[:] = q
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
        with self._scene_lock:
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
        """Advance n physics steps: motor law -> saturation -> overload, heat -> mj_step."""
        a = self.actuators
        tau, seen = self._tau, self._seen
        for _ in range(n):
            q, dq = self.data.qpos[self._qsel], self.data.qvel[self._vsel]
            if self._play:
                np.clip(seen, q - self._half_play, q + self._half_play, out=seen)
            else:
                seen = q
            self._steps += 1
            with a.lock:
                mit = a.mode == MODE_MIT
                own = a.kp > 0.0  # a bus wrote gains; otherwise the factory gains
                kp = np.where(mit | own, a.kp, self.position_kp)
                kd = np.where(mit | own, a.kd, self.position_kd)
                np.multiply(kp, a.goal_q - seen, out=tau)
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
                if self._steps % HEAT_EVERY == 0:
                    self._heat(a)
                self.data.ctrl[:] = tau
            # Outside the lock: the servos' replies never wait for a physics step (mj_step
            # releases the GIL, and taking it back can wait behind the camera thread).
            mujoco.mj_step(self.model, self.data)
            q, dq = self.data.qpos[self._qsel], self.data.qvel[self._vsel]
            a.publish_present(q, dq, tau)  # what the servos answer with, lock-free
            with a.lock:
                a.q[:] = q
                a.dq[:] = dq
                a.tau[:] = tau

    def _heat(self, a: Actuators) -> None:
        """Temperature update (under the actuator lock): copper losses against one thermal
        resistance and mass (sim/motors.py); over the limit, an overheating shutdown."""
        rise = self._tau / self.stall_torque
        rise *= rise
        self._temperature += self._heat_rate * (
            AMBIENT_C + self._heat_rise * rise - self._temperature)
        hot = self._temperature > self._temperature_limit
        if hot.any():
            a.hw_error[hot] |= HW_OVERHEATING
            a.torque_enabled[hot] = False
        a.temperature_c[:] = self._temperature

    # -- rendering -----------------------------------------------------------------------
    def snapshot(self, dst: mujoco.MjData) -> None:
        """Copy what a renderer needs (poses, blocks, time) into another MjData."""
        # The scene lock orders this against block moves and teleports, and only those: a
        # step running meanwhile can make poses up to one physics step (1 ms) apart, invisible
        # in a frame. Never the actuator lock: this thread runs at ordinary priority.
        with self._scene_lock:
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
