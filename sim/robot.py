"""A simulated robot from its description: an MJCF file plus the config (docs/your-robot.md).

`describe(cfg)` reads the MJCF that `sim.robot.mjcf` names (duet's arm when none), checks it
against the config and builds what the sim runs: the MuJoCo model with duet's task scene
(sim/assets/task_scene.xml: table, blocks, lights) added, one torque motor per configured joint
(whatever actuators the MJCF had are replaced: the emulated motors' control law drives them),
a camera on every site a sim camera is mounted on, and per joint the motor figures
(sim/motors.py) the physics applies. No Python per robot: everything robot-specific is in the
two files, and every refusal names the config key or the MJCF element at fault.

What the MJCF must have: the robot's joints (hinge or slide) under the names `robot.joints`
lists, the end-effector site, and either a camera of each configured sim camera's name or the
site it is mounted on. What it may have: a keyframe "home" (the power-on pose; otherwise every
joint at 0, or the nearest limit), joint equality constraints (a mirrored finger follows its
driven joint), the task scene's blocks of its own (`task/block_<colour>` bodies, then nothing is
added).
"""

from __future__ import annotations

import functools
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the import
import mujoco

from drivers.families import family_of
from runtime.config import ConfigError, DuetConfig, SimConfig, Workspace, load_config
from runtime.follower.buses import bus_sections
from runtime.follower.gravity import GravityChain
from sim.motors import FAMILY_DEFAULT, MotorModel, motor_model

ASSETS = Path(__file__).parent / "assets"
ARM_MJCF = ASSETS / "arm.xml"
TASK_SCENE = ASSETS / "task_scene.xml"
SCENE_PREFIX = "task/"  # names of the task scene's elements in the built model
# duet's arm as configs/sim.yaml describes it: what `SimWorld()` builds without a config
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "sim.yaml"
BLOCK_COLOURS = ("red", "green", "blue", "yellow")
BLOCK_HALF = 0.025  # m, half the edge of the block cubes in task_scene.xml


class RobotError(ConfigError):
    """A robot description that cannot be built; the message names the key or MJCF element."""


@dataclass(frozen=True)
class Coupling:
    """A joint the MJCF slaves to a configured one (a joint equality constraint):
    q[qadr] = c0 + c1 * q_robot[source]."""

    qadr: int
    dofadr: int
    source: int
    c0: float
    c1: float


@dataclass(frozen=True)
class MotorFigures:
    """Per-joint motor figures (arrays in robot.joints order) after config overrides."""

    models: tuple[MotorModel, ...]
    kp: np.ndarray
    kd: np.ndarray
    torque_max: np.ndarray
    backlash: np.ndarray
    heat_rise_c: np.ndarray
    heat_tau_s: np.ndarray
    temperature_limit_c: np.ndarray


class RobotDescription:
    """A robot the sim can run: `model(physics_hz)` builds a fresh MuJoCo model (each world
    owns one: block colours change per episode); the rest is read-only figures."""

    def __init__(self, name: str, mjcf: Path, joints: tuple[str, ...], spec: mujoco.MjSpec,
                 motors: MotorFigures, end_effector: str, tool_down: bool,
                 gripper: str | None, workspace: Workspace) -> None:
        self.name, self.mjcf, self.joints = name, mjcf, joints
        self.n = len(joints)
        self._spec = spec
        self.motors = motors
        self.end_effector = end_effector
        self.tool_down = tool_down
        self.workspace = workspace
        model = self.model()
        self.qadr = np.array([model.joint(j).qposadr[0] for j in joints])
        self.dofadr = np.array([model.joint(j).dofadr[0] for j in joints])
        self.q_min = np.array([model.joint(j).range[0] for j in joints])
        self.q_max = np.array([model.joint(j).range[1] for j in joints])
        self.gripper = None if gripper is None else joints.index(gripper)
        # the joints IK moves: all but the gripper
        self.arm = np.array([k for k in range(self.n) if k != self.gripper])
        self.couplings = _couplings(model, joints)
        self.home = _home(model, self.qadr, self.q_min, self.q_max)
        self.yaw = _yaw_joint(model, self)

    def model(self, physics_hz: float = 1000.0) -> mujoco.MjModel:
        if not physics_hz > 0:
            raise ValueError(f"physics_hz must be positive, got {physics_hz}")
        try:
            model = self._spec.compile()
        except ValueError as exc:
            raise RobotError(f"sim.robot.mjcf: {self.mjcf}: {exc}") from None
        model.opt.timestep = 1.0 / physics_hz
        return model

    def gravity_chain(self) -> GravityChain:
        """The bodies that carry the robot's joints, as identification's gravity model
        (runtime/follower/gravity.py): the joints' own bodies, everything below them, and the
        fixed bodies above them."""
        return _gravity_chain(self.model(), self)

    def start_noise(self, arm: float, yaw: float, gripper: float) -> np.ndarray:
        """A per-joint amplitude (rad): `yaw` on the base yaw joint, `gripper` on the
        gripper, `arm` on the others (data generation's random starts around home)."""
        noise = np.full(self.n, arm)
        if self.yaw is not None:
            noise[self.yaw] = yaw
        if self.gripper is not None:
            noise[self.gripper] = gripper
        return noise


def _names(elements: object) -> str:
    names = [e.name for e in elements if e.name]  # type: ignore[attr-defined]
    return ", ".join(names) if names else "none"


def _load_spec(path: Path) -> mujoco.MjSpec:
    if not path.is_file():
        raise RobotError(f"sim.robot.mjcf: no file {path}")
    try:
        return mujoco.MjSpec.from_file(str(path))
    except ValueError as exc:
        raise RobotError(f"sim.robot.mjcf: {path}: {exc}") from None


def _motor_figures(cfg: DuetConfig, spec: mujoco.MjSpec, mjcf: Path) -> MotorFigures:
    sim = cfg.sim or SimConfig()
    joints = list(cfg.robot.joints)
    family = {name: family_of(bus).name for bus, names in bus_sections(cfg) for name in names}
    ctrl = {a.target: float(a.ctrlrange[1]) for a in spec.actuators
            if a.trntype == mujoco.mjtTrn.mjTRN_JOINT and a.ctrlrange[1] > 0}
    rows: list[dict[str, float]] = []
    models: list[MotorModel] = []
    for k, joint in enumerate(joints):
        key = f"sim.robot.motors.{k}"
        if sim.robot.motors is None:
            model = motor_model(FAMILY_DEFAULT[family[joint]])
            if joint not in ctrl:
                raise RobotError(f"sim.robot.motors: joint {joint!r} has no motor model, and"
                                 f" {mjcf.name} has no <motor> with a ctrlrange on it")
            # a family's guess, not a named gearbox: no play (duet's own arm on every bus
            # family is ideal, and its reference followers were trained so)
            over: dict[str, float | None] = {"torque_max": ctrl[joint], "backlash": 0.0}
        else:
            entry = sim.robot.motors[k]
            try:
                model = motor_model(entry.model)
            except KeyError as exc:
                raise RobotError(f"{key}.model: {exc.args[0]}") from None
            if model.family != family[joint]:
                raise RobotError(f"{key}.model: {model.name} is a {model.family} motor, but"
                                 f" joint {joint!r} is on a {family[joint]} bus")
            over = entry.model_dump(exclude={"model"})
        if family[joint] == "mit_can":  # MIT motors run with the gains their bus sends
            bus, names = next((b, ns) for b, ns in bus_sections(cfg) if joint in ns)
            gains = {"kp": bus.kp[names.index(joint)], "kd": bus.kd[names.index(joint)]}  # type: ignore[union-attr]
            over = {**over, **{g: v for g, v in gains.items() if over.get(g) is None}}
        models.append(model)
        rows.append({f: getattr(model, f) if over.get(f) is None else float(over[f])  # type: ignore[arg-type]
                     for f in ("kp", "kd", "torque_max", "backlash", "heat_rise_c",
                               "heat_tau_s", "temperature_limit_c")})
    cols = {f: np.array([r[f] for r in rows]) for f in rows[0]}
    return MotorFigures(tuple(models), **cols)


def _add_task_scene(spec: mujoco.MjSpec) -> None:
    if spec.body(f"{SCENE_PREFIX}block_red") is not None:
        return  # the MJCF brings its own
    scene = mujoco.MjSpec.from_file(str(TASK_SCENE))
    # attaching brings bodies, geoms and lights; the scene's lighting is copied over
    light, own = scene.visual.headlight, spec.visual.headlight
    own.ambient, own.diffuse, own.specular = light.ambient, light.diffuse, light.specular
    spec.visual.quality.shadowsize = scene.visual.quality.shadowsize
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        spec.attach(scene, prefix=SCENE_PREFIX, frame=spec.worldbody.add_frame())


def _drive_joints(spec: mujoco.MjSpec, joints: list[str], torque_max: np.ndarray) -> None:
    """One torque motor per configured joint, in robot.joints order (data.ctrl[k] is joint
    k's torque); the MJCF's own actuators go."""
    for actuator in list(spec.actuators):
        spec.delete(actuator)
    for joint, limit in zip(joints, torque_max, strict=True):
        motor = spec.add_actuator(name=joint, target=joint, trntype=mujoco.mjtTrn.mjTRN_JOINT)
        motor.set_to_motor()
        motor.ctrllimited = 1
        motor.ctrlrange = [-limit, limit]


def _mount_cameras(spec: mujoco.MjSpec, cfg: DuetConfig, mjcf: Path) -> None:
    for name, cam in cfg.planner.cameras.items():
        if cam.kind != "sim":
            continue
        key = f"planner.cameras.{name}"
        if cam.site is None:
            if spec.camera(name) is None:
                raise RobotError(f"{key}: {mjcf.name} has no camera {name!r} (its cameras: "
                                 f"{_names(spec.cameras)}); or mount one on a site ({key}.site)")
        else:
            site = spec.site(cam.site)
            if site is None:
                raise RobotError(f"{key}.site: {mjcf.name} has no site {cam.site!r} (its sites:"
                                 f" {_names(spec.sites)})")
            if spec.camera(name) is not None:
                raise RobotError(f"{key}.site: {mjcf.name} already has a camera {name!r}")
            camera = site.parent.add_camera(name=name, pos=site.pos, quat=site.quat,
                                            fovy=cam.fovy)
            camera.alt = site.alt  # the site's orientation as the MJCF wrote it (xyaxes, ...)
        glob = spec.visual.global_
        glob.offwidth = max(glob.offwidth, cam.width)  # the offscreen buffer holds a frame
        glob.offheight = max(glob.offheight, cam.height)


def _couplings(model: mujoco.MjModel, joints: tuple[str, ...]) -> tuple[Coupling, ...]:
    ids = {model.joint(j).id: k for k, j in enumerate(joints)}
    out = []
    for e in range(model.neq):
        if model.eq_type[e] != mujoco.mjtEq.mjEQ_JOINT:
            continue
        j1, j2 = int(model.eq_obj1id[e]), int(model.eq_obj2id[e])
        if j2 in ids and j1 not in ids:
            c0, c1 = float(model.eq_data[e, 0]), float(model.eq_data[e, 1])
            out.append(Coupling(int(model.jnt_qposadr[j1]), int(model.jnt_dofadr[j1]), ids[j2],
                                c0, c1))
    return tuple(out)


def _gravity_chain(model: mujoco.MjModel, robot: RobotDescription) -> GravityChain:
    robot_joint = {int(model.joint(name).id): k for k, name in enumerate(robot.joints)}
    coupled = {int(model.dof_jntid[c.dofadr]): c for c in robot.couplings}
    roots = {int(model.jnt_bodyid[j]) for j in robot_joint}
    keep: set[int] = set()
    for b in range(1, model.nbody):  # below a robot joint's body, or above one
        up, chain = b, []
        while up > 0:
            chain.append(up)
            up = int(model.body_parentid[up])
        if roots & set(chain):
            keep.update(chain)
    order = sorted(keep)  # MuJoCo numbers a parent before its children
    index = {b: i for i, b in enumerate(order)}
    fields: dict[str, list[object]] = {k: [] for k in (
        "parent", "pos", "rot", "joint", "scale", "offset", "coupled", "slide", "anchor", "axis",
        "mass", "com")}
    for b in order:
        rot = np.zeros(9)
        mujoco.mju_quat2Mat(rot, model.body_quat[b])
        joint, scale, offset, is_coupled, slide = -1, 1.0, 0.0, False, False
        anchor, axis = [0.0, 0.0, 0.0], [0.0, 0.0, 1.0]
        body = model.body(b).name
        for j in range(model.body_jntadr[b], model.body_jntadr[b] + model.body_jntnum[b]):
            kind = int(model.jnt_type[j])
            if j not in robot_joint and j not in coupled:
                continue  # a passive joint: taken as fixed where the model starts it
            if joint >= 0:
                raise RobotError(f"sim.robot.mjcf: body '{body}' has more than one joint that "
                                 "a robot joint moves; the gravity model takes one per body")
            if kind not in (int(mujoco.mjtJoint.mjJNT_HINGE), int(mujoco.mjtJoint.mjJNT_SLIDE)):
                raise RobotError(f"sim.robot.mjcf: joint '{model.joint(j).name}' is neither "
                                 "a hinge nor a slide")
            q0 = float(model.qpos0[model.jnt_qposadr[j]])
            if j in robot_joint:
                joint, offset = robot_joint[j], -q0
            else:
                c = coupled[j]
                joint, scale, offset, is_coupled = c.source, c.c1, c.c0 - q0, True
            slide = kind == int(mujoco.mjtJoint.mjJNT_SLIDE)
            anchor, axis = model.jnt_pos[j].tolist(), model.jnt_axis[j].tolist()
        parent = int(model.body_parentid[b])
        for key, value in (("parent", index.get(parent, -1)), ("pos", model.body_pos[b].tolist()),
                           ("rot", rot.reshape(3, 3).tolist()), ("joint", joint),
                           ("scale", scale), ("offset", offset), ("coupled", is_coupled),
                           ("slide", slide), ("anchor", anchor), ("axis", axis),
                           ("mass", float(model.body_mass[b])),
                           ("com", model.body_ipos[b].tolist())):
            fields[key].append(value)
    return GravityChain(joints=list(robot.joints), gravity=model.opt.gravity.tolist(),
                        **fields)  # type: ignore[arg-type]


def _home(model: mujoco.MjModel, qadr: np.ndarray, q_min: np.ndarray,
          q_max: np.ndarray) -> np.ndarray:
    key = mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_KEY, "home")
    home = model.key_qpos[key, qadr].copy() if key >= 0 else np.zeros(len(qadr))
    return np.clip(home, q_min, q_max)


def _yaw_joint(model: mujoco.MjModel, robot: RobotDescription) -> int | None:
    """The first arm joint turning about the vertical at home (a base yaw), if any."""
    data = mujoco.MjData(model)
    data.qpos[robot.qadr] = robot.home
    mujoco.mj_kinematics(model, data)
    for k in robot.arm:
        j = model.joint(robot.joints[k]).id
        if model.jnt_type[j] == mujoco.mjtJoint.mjJNT_HINGE and \
                abs(abs(float(data.xaxis[j][2])) - 1.0) < 1e-6:
            return int(k)
    return None


def _check_joints(spec: mujoco.MjSpec, cfg: DuetConfig, mjcf: Path) -> None:
    kinds = (mujoco.mjtJoint.mjJNT_HINGE, mujoco.mjtJoint.mjJNT_SLIDE)
    for k, joint in enumerate(cfg.robot.joints):
        j = spec.joint(joint)
        if j is None:
            raise RobotError(f"robot.joints.{k}: {joint!r} is not a joint of {mjcf.name} (its"
                             f" joints: {_names(spec.joints)})")
        if j.type not in kinds:
            raise RobotError(f"robot.joints.{k}: <joint name={joint!r}> in {mjcf.name} is a"
                             f" {j.type.name}; a motor drives a hinge or a slide")
        lo, hi = cfg.robot.limits.position_min[k], cfg.robot.limits.position_max[k]
        if j.limited == mujoco.mjtLimited.mjLIMITED_TRUE or (
                j.limited == mujoco.mjtLimited.mjLIMITED_AUTO and j.range[1] > j.range[0]):
            if lo < j.range[0] - 1e-9 or hi > j.range[1] + 1e-9:
                raise RobotError(f"robot.limits: joint {joint!r} may go [{lo}, {hi}] but its"
                                 f" <joint range> in {mjcf.name} is"
                                 f" [{j.range[0]:g}, {j.range[1]:g}]")
        else:  # the MJCF leaves it free: the config's limits are its range
            j.limited = mujoco.mjtLimited.mjLIMITED_TRUE
            j.range = [lo, hi]


def build(cfg: DuetConfig) -> RobotDescription:
    """The robot `cfg` describes (no cache: see `describe`)."""
    sim = cfg.sim or SimConfig()
    mjcf = Path(sim.robot.mjcf) if sim.robot.mjcf is not None else ARM_MJCF
    spec = _load_spec(mjcf)
    _check_joints(spec, cfg, mjcf)
    joints = list(cfg.robot.joints)
    if sim.robot.gripper is not None and sim.robot.gripper not in joints:
        raise RobotError(f"sim.robot.gripper: {sim.robot.gripper!r} is not in robot.joints")
    if spec.site(sim.robot.end_effector) is None:
        raise RobotError(f"sim.robot.end_effector: {mjcf.name} has no site"
                         f" {sim.robot.end_effector!r} (its sites: {_names(spec.sites)})")
    motors = _motor_figures(cfg, spec, mjcf)
    _add_task_scene(spec)
    _drive_joints(spec, joints, motors.torque_max)
    _mount_cameras(spec, cfg, mjcf)
    robot = RobotDescription(cfg.robot.name, mjcf, tuple(joints), spec, motors,
                             sim.robot.end_effector, sim.robot.tool_down, sim.robot.gripper,
                             sim.robot.workspace)
    if len(robot.arm) < 5 and robot.tool_down:
        raise RobotError(f"sim.robot.tool_down: {len(robot.arm)} arm joints cannot hold the"
                         " tool pointing down anywhere; set it false (position only)")
    return robot


_CACHE: dict[str, RobotDescription] = {}


def describe(cfg: DuetConfig) -> RobotDescription:
    """The robot `cfg` describes, built once per description (the MJCF's file and what the
    config says of the robot, its buses and its cameras)."""
    sim = cfg.sim or SimConfig()
    mjcf = Path(sim.robot.mjcf) if sim.robot.mjcf is not None else ARM_MJCF
    stamp = mjcf.stat().st_mtime_ns if mjcf.is_file() else None
    key = json.dumps([str(mjcf), stamp, sim.robot.model_dump(mode="json"),
                      cfg.robot.model_dump(mode="json"),
                      [b.model_dump(mode="json") for b, _ in bus_sections(cfg)],
                      {k: c.model_dump(mode="json") for k, c in cfg.planner.cameras.items()}],
                     sort_keys=True)
    robot = _CACHE.get(key)
    if robot is None:
        robot = _CACHE[key] = build(cfg)
    return robot


@functools.cache
def default_robot() -> RobotDescription:
    """duet's arm (configs/sim.yaml)."""
    return describe(load_config(DEFAULT_CONFIG))
