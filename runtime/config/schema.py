"""The config schema: every section and key of a robot config, typed and bounded (pydantic),
with its default. The defaults live here and nowhere else; what reads a config (the processes,
eval, benches, the generated reference in docs/) takes them from these models.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    field_validator,
    model_validator,
)

from drivers.dynamixel_protocol import MAX_ID
from drivers.families import check_budget, family_of
from drivers.feetech_protocol import BAUD_RATES as FEETECH_BAUD_RATES
from drivers.feetech_protocol import MAX_ID as FEETECH_MAX_ID
from drivers.feetech_protocol import MODELS as FEETECH_MODELS
from drivers.mit_dialects import DIALECTS, dialect_class


class ConfigError(Exception):
    """A config that cannot be used. The message names file, key and reason."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every number here can reach the motor path; +-inf and NaN never do.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def _distinct(ids: list[int]) -> list[int]:
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:  # two motors on one id answer as one (or collide): refused here, not at start
        raise ValueError(f"each motor needs its own id; {', '.join(map(str, twice))}"
                         f" appear{'s' if len(twice) == 1 else ''} more than once")
    return ids


class Limits(_Strict):
    position_min: list[float]  # rad, per joint: the safety filter clips every command to ≥ this
    position_max: list[float]  # rad, per joint (> position_min): every command is clipped to ≤ it
    # Strictly positive: a zero or negative limit would invert the safety filter's clip.
    velocity_max: list[PositiveFloat]  # rad/s
    accel_max: list[PositiveFloat]  # rad/s^2
    effort_max: list[PositiveFloat] | None = None  # N·m, torque modes only
    # a measured position this far outside [position_min, position_max] is a FAULT
    state_margin: float = Field(0.15, ge=0, le=3.2)
    # plans whose waypoints leave the position range by more than this are dropped
    plan_margin: float = Field(0.3, ge=0, le=3.2)


class RobotConfig(_Strict):
    name: str  # a label for this robot, written into each recording's metadata
    # joint names; the per-joint lists (limits, and `bus` ids and gains) follow this order, and a
    # bundle's contract may name only these
    joints: list[str] = Field(min_length=1)
    limits: Limits  # per-joint lists, one entry per joint in `joints` order

    @model_validator(mode="after")
    def _limits_match_joints(self) -> RobotConfig:
        n = len(self.joints)
        for key in ("position_min", "position_max", "velocity_max", "accel_max", "effort_max"):
            value = getattr(self.limits, key)
            if value is not None and len(value) != n:
                raise ValueError(f"limits.{key} has {len(value)} entries, joints has {n}")
        lims = zip(self.limits.position_min, self.limits.position_max, strict=True)
        for j, (lo, hi) in enumerate(lims):
            if lo >= hi:
                raise ValueError(f"joint {self.joints[j]!r}: position_min >= position_max")
        return self


class DynamixelBusConfig(_Strict):
    kind: Literal["dynamixel"] = "dynamixel"  # Protocol 2.0 servos, run in Position Control mode
    device: str  # serial device; "sim" = the pty the sim prints
    baudrate: int = Field(4_000_000, gt=0)  # bit/s, as set in the servos; bounds a tick's wire time
    # servo ids (distinct, 0..252), one per joint (robot.joints order, or `joints` under `buses:`)
    ids: Annotated[list[Annotated[int, Field(ge=0, le=MAX_ID)]], AfterValidator(_distinct)]
    # encoder tick of each joint's zero and its direction (+1/-1)
    zero_ticks: list[int] | None = None
    direction: list[int] | None = None  # +1/-1 per joint (none: all +1); -1 flips q, dq, effort
    # per transaction (sync read, register access); a reply later than this is a timeout (then
    # `retries`)
    timeout_ms: float = Field(5.0, gt=0, le=1000)
    # further tries of a failed transaction before it is a bus error (a FAULT after
    # follower.bus_error_threshold in a row)
    retries: int = Field(1, ge=0, le=10)
    # µs, each servo's Return Delay Time as the config's wire-budget check assumes it; at start
    # the bus reads every servo's own setting instead
    return_delay_us: float = Field(0.0, ge=0, le=508)
    # the robot joints this bus drives, in `ids` order (required under `buses:`)
    joints: list[str] | None = None


class FeetechBusConfig(_Strict):
    kind: Literal["feetech"] = "feetech"  # Feetech STS/SCS serial-bus servos, run in position mode
    device: str  # serial device; "sim" = the pty the sim prints
    # bit/s, as set in the servos (Baud Rate register: 1000000 down to 38400); bounds a tick's
    # wire time
    baudrate: int = Field(1_000_000, gt=0)
    # the servo model on every joint of this bus (drivers/feetech_protocol.py MODELS): its
    # series (byte order, EEPROM lock), resolution and stall torque; checked at start against
    # each servo's Model Number
    model: str = "STS3215"
    # servo ids 0..252, one per joint (robot.joints order, or `joints` under `buses:`)
    ids: list[int]
    # encoder tick of each joint's zero (none: the model's centre, 2048 on an STS3215)
    zero_ticks: list[int] | None = None
    direction: list[int] | None = None  # +1/-1 per joint (none: all +1); -1 flips q, dq, effort
    # per transaction (sync read, register access); a reply later than this is a timeout (then
    # `retries`)
    timeout_ms: float = Field(5.0, gt=0, le=1000)
    # further tries of a failed transaction before it is a bus error (a FAULT after
    # follower.bus_error_threshold in a row)
    retries: int = Field(1, ge=0, le=10)
    # µs, each servo's Return Delay Time (register 7, 2 µs units; 0 on a configured arm, up to
    # 500 µs from the factory) as the config's wire-budget check assumes it; at start the bus
    # reads every servo's own setting instead
    return_delay_us: float = Field(0.0, ge=0, le=510)
    # the robot joints this bus drives, in `ids` order (required under `buses:`)
    joints: list[str] | None = None

    @field_validator("model")
    @classmethod
    def _known_model(cls, model: str) -> str:
        if model not in FEETECH_MODELS:
            raise ValueError(f"{model!r} is not one of {', '.join(FEETECH_MODELS)}")
        return model

    @field_validator("baudrate")
    @classmethod
    def _servo_baudrate(cls, baudrate: int) -> int:
        if baudrate not in FEETECH_BAUD_RATES.values():
            rates = ", ".join(str(r) for r in FEETECH_BAUD_RATES.values())
            raise ValueError(f"{baudrate} is not a Feetech servo's rate ({rates})")
        return baudrate

    @field_validator("ids")
    @classmethod
    def _addressable(cls, ids: list[int]) -> list[int]:
        if len(set(ids)) != len(ids) or not all(0 <= i <= FEETECH_MAX_ID for i in ids):
            raise ValueError(f"ids must be unique and in 0..{FEETECH_MAX_ID}: "
                             f"{', '.join(map(str, ids))}")
        return ids


class MitMotorModel(_Strict):
    """Ranges of the 16/12-bit MIT-mode fields, per motor model (positive and finite)."""

    p_max: float = Field(gt=0, le=1e4)  # rad, position range is [-p_max, p_max]
    v_max: float = Field(gt=0, le=1e4)  # rad/s
    t_max: float = Field(gt=0, le=1e4)  # N·m
    kp_max: float = Field(500.0, gt=0, le=1e5)  # N·m/rad, kp range is [0, kp_max]
    kd_max: float = Field(5.0, gt=0, le=1e4)  # N·m·s/rad, kd range is [0, kd_max]


class CanBusConfig(_Strict):
    kind: Literal["mit_can"] = "mit_can"  # MIT-mode motors: one command, one reply per tick each
    # wire dialect of the motors (drivers/mit_dialects.py): generic (Katz firmware),
    # damiao, cubemars, myactuator
    dialect: str = "generic"
    interface: str = "socketcan"  # any python-can interface name
    channel: str = "can0"  # the python-can channel (socketcan: the network interface)
    bitrate: int = Field(1_000_000, gt=0)  # nominal (arbitration) rate
    fd: bool = False  # CAN FD frames with bit-rate switching (Damiao)
    data_bitrate: int = Field(5_000_000, gt=0)  # FD data phase
    # CAN ids (distinct), one per joint (robot.joints order, or `joints` under `buses:`)
    ids: Annotated[list[int], AfterValidator(_distinct)]
    master_ids: list[int] | None = None  # reply ids, when they differ from `ids`
    # the motors' MIT field ranges; they must match the firmware, or every value is mis-scaled
    model: MitMotorModel
    kp: list[float]  # N·m/rad per motor, `ids` order, ≤ model.kp_max; sent with every command
    kd: list[float]  # N·m·s/rad per motor, `ids` order, ≤ model.kd_max; sent with every command
    # per exchange: a motor whose reply is not in within this is a timeout, a bus error
    timeout_ms: float = Field(2.0, gt=0, le=1000)
    direction: list[int] | None = None  # +1/-1 per motor (none: all +1); -1 flips q, dq, torque
    # start-up: the most a goal reconstructed from a motor's reply may differ from its
    # measured position (drivers/can_mit.py)
    hold_jump_max_rad: float = Field(0.1, gt=0, le=1.0, allow_inf_nan=False)
    # the robot joints this bus drives, in `ids` order (required under `buses:`)
    joints: list[str] | None = None

    @model_validator(mode="after")
    def _motors_speak_the_dialect(self) -> CanBusConfig:
        if self.dialect not in DIALECTS:
            raise ValueError(f"dialect {self.dialect!r} is not one of {', '.join(DIALECTS)}")
        dialect = dialect_class(self.dialect)
        dialect(self.ids, self.master_ids)  # ids the dialect cannot address are refused here
        if self.fd and not dialect.supports_fd:
            raise ValueError(f"fd: dialect {self.dialect!r} speaks classic CAN only")
        if self.fd and self.data_bitrate < self.bitrate:
            raise ValueError(f"data_bitrate {self.data_bitrate} is below bitrate {self.bitrate}")
        m = self.model
        for key, gains, hi in (("kp", self.kp, m.kp_max), ("kd", self.kd, m.kd_max)):
            if len(gains) != len(self.ids):
                raise ValueError(f"{key} has {len(gains)} entries, ids has {len(self.ids)}")
            for k, g in enumerate(gains):
                if not 0 <= g <= hi:  # NaN fails too
                    raise ValueError(f"{key}[{k}] = {g} is outside [0, {hi:g}] (model.{key}_max)")
        return self


BusConfig = DynamixelBusConfig | FeetechBusConfig | CanBusConfig


class RealtimeConfig(_Strict):
    # 0 = do not ask; the follower's and the planner's ZeroMQ I/O threads (which carry the
    # plan) get one below it, where permitted (runtime/ipc/iothreads.py)
    sched_fifo_priority: int = Field(0, ge=0, le=99)
    cpu: int | None = None  # pin the follower to this core
    mlockall: bool = False  # lock the follower's memory: no tick waits on a page fault


class DeadlineStorm(_Strict):
    """A FAULT when `misses` of the last `window_ticks` ticks were late: a late tick ends more
    than one period after its deadline."""

    misses: int = Field(50, gt=0, le=100_000)  # late ticks in the window that make a FAULT
    window_ticks: int = Field(500, gt=0, le=100_000)  # the sliding window (500: 1 s at 500 Hz)


class Health(_Strict):
    """What `duet status` calls unhealthy, over the follower's last second."""

    max_miss_ratio: float = Field(0.005, ge=0, le=1)  # deadline misses / ticks
    min_rate_ratio: float = Field(0.99, ge=0, le=1)  # achieved / target rate


class FollowerConfig(_Strict):
    # ticks per second; each tick reads and writes every motor, so each bus must carry that
    # (the wire budget), and a bundle's look-ahead must be a whole number of ticks
    hz: float = Field(500.0, gt=0, le=2000)
    blend_ms: float = Field(80.0, ge=0, le=2000)  # tunable
    # how consecutive plans combine (runtime/follower/reference.py): blend cross-fades over
    # `blend_ms`; switch takes the newest at once; average: 0.3 old / 0.7 new where chunks
    # overlap; broker finishes a chunk before taking the next
    chunk_strategy: Literal["blend", "broker", "average", "switch"] = "blend"
    # no plan from an observation newer than this -> HOLD; an older plan is never executed
    plan_timeout_ms: float = Field(500.0, gt=0, le=10_000)
    residual: bool = True  # tunable
    residual_max: float = Field(0.05, ge=0, le=1.0)  # rad, tunable
    # Low-pass on the residual, tunable. 50 ms: the reference follower's tick-to-tick output
    # steps then rarely exceed the command acceleration limit (20 ms: clamps on ~half the
    # ticks at 100 rad/s^2), for ~10 % more tracking error (`duet eval`,
    # docs/results/evaluation.md).
    residual_filter_ms: float = Field(50.0, ge=0, le=10_000)
    hold_decel: float = Field(4.0, gt=0, le=1000)  # rad/s^2 when braking to a hold
    bus_error_threshold: int = Field(5, gt=0, le=10_000)  # failed transactions in a row -> FAULT
    # on FAULT: hold brakes to rest at `hold_decel` with torque on; torque_off: motors limp
    fault_action: Literal["hold", "torque_off"] = "hold"
    stop_action: Literal["hold", "torque_off"] = "hold"  # on SIGTERM
    deadline_storm: DeadlineStorm = DeadlineStorm()  # too many late ticks -> FAULT
    health: Health = Health()  # what `duet status` reports as unhealthy
    realtime: RealtimeConfig = RealtimeConfig()  # best effort: each outcome logged at start
    spin_us: float = Field(200.0, ge=0, le=5000)  # busy-wait this long before each deadline
    state_pub_every: int = Field(1, gt=0, le=10_000)  # publish state every N ticks
    # telemetry messages/s (status, top, recorder); sent only with ≥ 0.4 ms to the deadline
    telemetry_hz: float = Field(20.0, gt=0, le=100)


class CameraConfig(_Strict):
    """One robot camera. A `sim` camera is the sim's MuJoCo camera of the same name."""

    kind: Literal["sim", "v4l2"] = "sim"  # v4l2: a V4L2 device, grabbed with OpenCV
    device: str = "/dev/video0"  # the V4L2 device (kind v4l2)
    # px of the frames the planner gets: a sim camera renders at it, V4L2 frames are resized
    width: int = Field(96, gt=0, le=8192)
    height: int = Field(96, gt=0, le=8192)  # px, as `width`
    fps: float = Field(15.0, gt=0, le=1000)  # asked of a V4L2 device; sim: sim.camera_hz
    # kind sim: the MJCF site the sim mounts this camera on (the site's -z axis is the view
    # direction, +y is up in the image); none: the MJCF's own camera of this name
    site: str | None = None
    fovy: float = Field(60.0, gt=0, lt=180)  # degrees, vertical field of view of a camera on `site`
    # the newest frame older than this: no plan this cycle (status camera_stale)
    stale_ms: float = Field(500.0, gt=0, le=60_000)


TCP_ENDPOINT = r"^tcp://[^\s/:]+:[0-9]{1,5}$"


class RemoteConfig(_Strict):
    """The robot's side of an off-board planner: the planner process relays state, frames
    and task to the planner server at `endpoint` and its plans back to the follower."""

    endpoint: str = Field(pattern=TCP_ENDPOINT)  # tcp://HOST:PORT of `duet planner --listen`
    server_key: str | None = None  # the server's public certificate (NAME.key)
    robot_key: str | None = None  # this robot's secret certificate (NAME.key_secret, 0600)
    insecure: bool = False  # plaintext TCP, no authentication: `duet doctor` flags it
    jpeg_quality: int = Field(90, ge=10, le=100)  # of the frames sent; lower: smaller frames
    max_frame_bytes: int = Field(1 << 20, gt=0, le=16 << 20)  # one encoded frame

    @model_validator(mode="after")
    def _keys_unless_insecure(self) -> RemoteConfig:
        if not self.insecure and (self.server_key is None or self.robot_key is None):
            raise ValueError("server_key and robot_key are required (`duet keys generate`); "
                             "plaintext only with insecure: true")
        return self


class RayServeConfig(_Strict):
    """Batches handed to a Ray Serve deployment (runtime/remote/ray_backend.py)."""

    address: str | None = None  # a running Ray cluster (ray://... or auto); None: start one here
    replicas: int = Field(1, ge=1, le=1024)  # copies of the pipeline; Serve restarts a dead one
    gpus_per_replica: float = Field(0.0, ge=0, le=8)  # Ray's num_gpus; a fraction shares a GPU
    cpus_per_replica: float = Field(1.0, gt=0, le=256)  # Ray's num_cpus
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)  # @serve.batch's batch_wait_timeout_s


class ServeConfig(_Strict):
    """`duet planner --listen tcp://HOST:PORT`: this host plans for robots over the network."""

    listen: str | None = Field(None, pattern=TCP_ENDPOINT)  # bound here; --listen sets it
    key: str | None = None  # the server's secret certificate (NAME.key_secret, 0600)
    allow: str | None = None  # a directory of the admitted robots' public keys (*.key)
    insecure: bool = False  # plaintext, anyone who reaches the port: `duet doctor` flags it
    rate_hz: float = Field(20.0, gt=0, le=1000)  # the most observations served per robot
    # robots served at once; a new one is dropped while all are active (60 s silent: forgotten)
    max_robots: int = Field(64, ge=1, le=4096)
    # one encoded frame from a robot; times the cameras, it caps a message (ZMQ_MAXMSGSIZE)
    max_frame_bytes: int = Field(1 << 20, gt=0, le=16 << 20)
    # width x height of one frame, read from its JPEG header and refused before decoding
    max_frame_pixels: int = Field(4096 * 4096, gt=0, le=1 << 26)
    # local: this process runs the pipeline (bundle.engine); ray: a Ray Serve deployment
    engine: Literal["local", "ray"] = "local"
    ray: RayServeConfig = RayServeConfig()  # the deployment (engine: ray)

    @model_validator(mode="after")
    def _keys_unless_insecure(self) -> ServeConfig:
        if not self.insecure and (self.key is None or self.allow is None):
            raise ValueError("key and allow are required (`duet keys generate`); plaintext "
                             "only with insecure: true")
        return self


class PlannerConfig(_Strict):
    hz: float = Field(5.0, gt=0, le=50)  # cycles/s: fresh frames and state -> one plan
    # The robot's cameras by name; the bundle's contract says which it reads.
    cameras: dict[str, CameraConfig] = Field(default_factory=lambda: {"scene": CameraConfig()})
    # Where instructions come from: `operator` (`duet task`, the task socket) or `sim` (the
    # sim's episodes; an operator's `duet task` still takes precedence until `duet task
    # --clear`). `instruction` is the task at start-up (empty: idle until one is set).
    task_source: Literal["operator", "sim"] = "operator"
    instruction: str = Field("", max_length=1000)  # used when the run dir keeps no task
    threads: int = Field(1, ge=1, le=64)  # ONNX Runtime intra-op threads per planner network
    flow_steps: int | None = Field(None, ge=1, le=256)  # override a flow head's K
    prefix: bool = True  # feed the action prefix to models that take one
    # set: this robot's planner runs off-board (the planner process relays to it)
    remote: RemoteConfig | None = None
    serve: ServeConfig | None = None  # this host serves robots (`duet planner --listen`)


OrtProvider = Literal["tensorrt", "cuda", "cpu"]


def _cpu_only() -> list[OrtProvider]:
    return ["cpu"]


class OnnxRuntimeConfig(_Strict):
    """ONNX Runtime's execution providers (bundle.engine: onnxruntime), in priority order: each
    node runs on the first provider that takes it. A provider this onnxruntime lacks, or one
    that fails to start, refuses the start (never a silent fall-back to the CPU)."""

    # The planner's. `duet install` on a Jetson puts tensorrt, cuda, cpu in the site file
    # unless the config names its own.
    planner_providers: list[OrtProvider] = Field(default_factory=_cpu_only, min_length=1)
    # The follower stays on the CPU unless told otherwise: a GPU launch + sync per 2 ms tick
    # costs more than its small network, and its unit grants no GPU device.
    follower_providers: list[OrtProvider] = Field(default_factory=_cpu_only, min_length=1)
    device_id: int = Field(0, ge=0)  # CUDA device (a Jetson has one: 0)
    trt_fp16: bool = True  # let TensorRT run fp32 layers in fp16 (Orin's tensor cores)
    trt_workspace_mb: int = Field(1024, gt=0)  # TensorRT builder scratch memory
    trt_timing_cache: bool = True  # layer timings kept beside the engines: faster rebuilds

    @model_validator(mode="after")
    def _distinct(self) -> OnnxRuntimeConfig:
        for key in ("planner_providers", "follower_providers"):
            names = getattr(self, key)
            if len(set(names)) != len(names):
                raise ValueError(f"{key} lists a provider twice: {', '.join(names)}")
        return self


class ShadowGate(_Strict):
    """What `duet bundle activate --if-shadow-ok` asks of the shadow report (run dir
    shadow.json, written by `duet bundle shadow VERSION`) before it activates VERSION."""

    min_plans: int = Field(20, ge=1)  # plans compared, at least; fewer: refused as too few
    # rad: the largest per-joint p95 of |candidate - active| over every horizon step
    max_p95_rad: float = Field(0.05, gt=0)
    max_mean_rad: float = Field(0.02, gt=0)  # rad: the mean |candidate - active|, all joints
    # the candidate's plan p99 over the active's latency p99, at most (None: not compared);
    # the candidate's latency is also checked against the robot's timing (plan timeout)
    max_latency_ratio: float | None = Field(1.5, gt=0)
    # added to the shadow process's nice value: it plans on what CPU the active leaves
    nice: int = Field(10, ge=0, le=19)


class ActivationWatch(_Strict):
    """After `duet bundle activate`, the new bundle's health is watched against a baseline
    taken from the live robot before the switch; a regression rolls back by itself
    (runtime/deploy/watch.py)."""

    window_s: float = Field(60.0, ge=0)  # s of the new bundle's planning watched; 0: no watch
    # s the new bundle may take from activation to its first plan (restart, load); longer is a
    # regression (it does not start)
    start_timeout_s: float = Field(300.0, gt=0)
    baseline_s: float = Field(5.0, gt=0)  # s of the live robot's telemetry taken as baseline
    # a figure regresses when it exceeds baseline x ratio + margin: planner latency p99
    latency_ratio: float = Field(2.0, ge=1)
    latency_margin_ms: float = Field(20.0, ge=0)  # ms (a loaded host jitters by this much)
    tracking_ratio: float = Field(2.0, ge=1)  # the p95 of the worst joint's tracking error
    tracking_margin_rad: float = Field(0.02, ge=0)  # rad
    miss_ratio_margin: float = Field(0.02, ge=0)  # the follower's deadline-miss ratio, mean


class BundleConfig(_Strict):
    # the bundle folder (manifest, contract, models); a relative path is from the file that
    # sets it; `duet install` points it at /var/lib/duet/bundles/current
    path: str
    public_key: str | None = None  # ed25519 public key file; when set, a signature is required
    # the rollback floor: `duet bundle activate` and `rollback` refuse a bundle whose (signed)
    # version stamp is older than this one's, e.g. 20250301-000000 (None: no floor). Versions
    # compare by their leading YYYYMMDD-HHMMSS, as `duet bundle create` names them.
    min_version: str | None = Field(None, pattern=r"^\d{8}-\d{6}")
    # runs the planner's and follower's networks: onnxruntime (on its providers, below) or
    # tensorrt (native plans from engine_cache)
    engine: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    # TensorRT plans, built on the robot by `duet engines build`; root-owned (engines are code).
    # ONNX Runtime's TensorRT engines go in its onnxruntime/ folder (built by the planner).
    engine_cache: str = "/var/lib/duet/engines"
    onnxruntime: OnnxRuntimeConfig = Field(default_factory=OnnxRuntimeConfig)  # engine: onnxruntime
    shadow: ShadowGate = Field(default_factory=ShadowGate)  # the shadow gate's thresholds
    watch: ActivationWatch = Field(default_factory=ActivationWatch)  # after an activation


class SimMotorConfig(_Strict):
    """One joint's emulated motor: a model of sim/motors.py, any of its figures overridden."""

    # XM430-W350, XM540-W270 (Dynamixel), STS3215 (Feetech), DM-J4310-2EC, DM-J4340-2EC (MIT)
    model: str
    # N·m/rad, the position-mode gain of a serial servo (an MIT bus sends its own kp); none: the
    # model's factory gain
    kp: float | None = Field(None, ge=0, le=1e4)
    kd: float | None = Field(None, ge=0, le=1e4)  # N·m·s/rad, as `kp`
    torque_max: float | None = Field(None, gt=0, le=1e4)  # N·m, saturation; none: the model's
    backlash: float | None = Field(None, ge=0, le=0.5)  # rad, total play of the gears; none: model
    # K above ambient after long running at torque_max (copper losses); none: the model's
    heat_rise_c: float | None = Field(None, ge=0, le=1000)
    heat_tau_s: float | None = Field(None, gt=0, le=1e5)  # s, thermal time constant; none: model's
    # °C: above it the motor latches an overheating error and lets go; none: the model's
    temperature_limit_c: float | None = Field(None, gt=0, le=200)


class Workspace(_Strict):
    """Where the touch task puts its blocks, around the robot's base axis (the MJCF's origin)."""

    radius: tuple[float, float] = (0.25, 0.44)  # m, nearest and farthest block centre
    bearing: tuple[float, float] = (-0.7, 0.7)  # rad around +x

    @model_validator(mode="after")
    def _ordered(self) -> Workspace:
        if not 0 < self.radius[0] < self.radius[1]:
            raise ValueError(f"radius must be 0 < near < far, got near {self.radius[0]:g} m, "
                             f"far {self.radius[1]:g} m")
        if not -3.15 < self.bearing[0] < self.bearing[1] < 3.15:
            raise ValueError(f"bearing must be -pi < from < to < pi, got from {self.bearing[0]:g}, "
                             f"to {self.bearing[1]:g} rad")
        return self


class SimRobotConfig(_Strict):
    """The simulated robot as a description (docs/your-robot.md): an MJCF file for its bodies
    and joints, plus what the MJCF does not say (its motors, its tool, the task's reach)."""

    # the robot's MJCF (a relative path is from this file); none: duet's arm, sim/assets/arm.xml.
    # Every robot.joints entry must be a hinge or slide joint of it.
    mjcf: str | None = None
    end_effector: str = "fingertip"  # MJCF site that touches the blocks (the expert's IK target)
    # the expert also points the end effector's z axis down (needs ≥ 5 arm joints); false:
    # position only
    tool_down: bool = True
    # robot joint the expert holds at its home value (the MJCF keyframe "home"); none: all arm
    gripper: str | None = "gripper"
    # one per robot.joints entry; none: the family's usual servo for every joint, torque limits
    # from the MJCF's <motor> ctrlrange
    motors: list[SimMotorConfig] | None = None
    workspace: Workspace = Workspace()  # where the task's blocks go


class SuccessMeasure(_Strict):
    """What `duet eval` counts as a success: the sim's touch task, or a target of a company's own
    task on its own robot (sim/success.py)."""

    # blocks: the sim's touch task (its blocks touched in order); pose: every joint named in
    # `pose` within tolerance_rad of its target; site: the MJCF site `site` within tolerance_m
    # of `position`
    kind: Literal["blocks", "pose", "site"] = "blocks"
    pose: dict[str, float] = Field(default_factory=dict)  # rad per joint (kind: pose); others free
    tolerance_rad: float = Field(0.05, gt=0)  # rad, per joint (kind: pose)
    site: str | None = None  # an MJCF site, e.g. the end effector's (kind: site)
    position: tuple[float, float, float] | None = None  # m, world frame (kind: site)
    tolerance_m: float = Field(0.02, gt=0)  # m, distance (kind: site)
    hold_s: float = Field(0.2, ge=0)  # s inside the tolerance in a row before it counts
    # the task the planner is given in these episodes (None: the sim's own instruction)
    instruction: str | None = None

    @model_validator(mode="after")
    def _complete(self) -> SuccessMeasure:
        if self.kind == "pose" and not self.pose:
            raise ValueError("kind pose needs `pose`: a target in rad for at least one joint")
        if self.kind == "site" and (self.site is None or self.position is None):
            raise ValueError("kind site needs `site` (an MJCF site) and `position` [x, y, z]")
        return self


class SimConfig(_Strict):
    # `duet run` starts the sim and the follower drives its emulated motors; `duet install`
    # refuses a config with it on
    enabled: bool = True
    seed: int = 0  # the episodes' block layouts and instructions; same seed, same episodes
    episode_timeout_s: float = Field(12.0, gt=0)  # sim seconds; then a timeout, the next episode
    two_step_fraction: float = Field(0.5, ge=0, le=1)  # chance an episode has two targets
    # two-target instructions: "touch A, then B" or "touch B after A" (sim/task.py PHRASINGS)
    phrasing: Literal["then", "after"] = "then"
    camera_hz: float = Field(10.0, gt=0)  # frames/s rendered and published per sim camera
    physics_hz: float = Field(1000.0, gt=0)  # MuJoCo steps per second (timestep 1/physics_hz)
    # the emulated motors: serial (Dynamixel or Feetech, a pty) or can (MIT mode, needed for
    # `buses:`); it must match the bus kind
    transport: Literal["serial", "can"] = "serial"
    # SCHED_FIFO priority of the emulated servos' serving thread (0 = don't ask): a real
    # servo answers in microseconds whatever the host is doing
    rt_priority: int = Field(0, ge=0, le=99)
    robot: SimRobotConfig = SimRobotConfig()  # the simulated robot's description
    success: SuccessMeasure = SuccessMeasure()  # what `duet eval` counts as a success


class RecorderConfig(_Strict):
    enabled: bool = False  # `duet run` starts it; `duet install` enables duet-recorder.service
    dir: str = "/var/lib/duet/recordings"  # episodes/, incidents/, continuous/ (MCAP)
    # MiB for all recordings: the oldest continuous segments, then incidents, are deleted to
    # stay under it (episodes never)
    budget_mb: float = Field(2048.0, gt=0)
    # s kept in memory; written out (then recording goes on) when the follower faults or estops
    ring_s: float = Field(30.0, gt=0)


class AccessConfig(_Strict):
    """Who may use the ipc sockets (runtime/ipc/access.py): checked by the kernel's peer
    credentials, no keys on one host."""

    # the only user whose plans the follower takes; None = the follower's own user (one user
    # runs everything, as `duet run` does). The robot's units set duet-planner.
    planner_user: str | None = None
    # the only user whose joint state the planner takes; None = the planner's own user. The
    # robot's units set duet (the follower's user).
    follower_user: str | None = None
    operator_group: str | None = "duet"  # status, estop, task; root and the service user: all


class DuetConfig(_Strict):
    robot: RobotConfig  # joints and their limits
    # one bus for every joint, or `buses`: one per limb, each naming its `joints`
    bus: BusConfig | None = Field(None, discriminator="kind")
    buses: list[Annotated[BusConfig, Field(discriminator="kind")]] | None = Field(
        None, min_length=1)  # one per limb: each names its `joints`, no two share a wire
    follower: FollowerConfig = FollowerConfig()  # the real-time loop that drives the motors
    planner: PlannerConfig = PlannerConfig()  # the slow system: cameras, task, plans
    bundle: BundleConfig  # the policy bundle and what runs its networks
    # the processes' ipc sockets, latch, task and summaries; --run-dir or $DUET_RUN_DIR
    # overrides it, and clients (status, estop) never read it from the config
    run_dir: str = "/run/duet"
    # where a latched FAULT/ESTOP is kept across a reboot (the run dir is cleared by one);
    # `duet install` sets /var/lib/duet/state; none: the run dir only (a workstation's runs)
    state_dir: str | None = None
    sim: SimConfig | None = None  # the simulated robot (none: a real one)
    recorder: RecorderConfig = RecorderConfig()  # the flight recorder
    access: AccessConfig = AccessConfig()  # who may use the ipc sockets

    @model_validator(mode="after")
    def _buses_drive_every_joint_once(self) -> DuetConfig:
        joints = self.robot.joints
        if (self.bus is None) == (self.buses is None):
            raise ValueError("give either `bus` (one bus) or `buses` (one per limb), not"
                             f" {'both' if self.bus is not None else 'neither'}")
        if self.bus is not None:
            sections = [("bus", self.bus, list(joints) if self.bus.joints is None
                         else self.bus.joints)]
            if sections[0][2] != list(joints):
                raise ValueError("bus.joints must be robot.joints in order (or left out)")
        else:
            assert self.buses is not None
            sections = []
            for b, bus in enumerate(self.buses):
                if not bus.joints:
                    raise ValueError(f"buses.{b}.joints: name the joints this bus drives")
                sections.append((f"buses.{b}", bus, bus.joints))
            owner: dict[str, str] = {}
            for key, _, names in sections:
                for name in names:
                    if name not in joints:
                        raise ValueError(f"{key}.joints: {name!r} is not in robot.joints")
                    if name in owner:
                        raise ValueError(f"{key}.joints: {name!r} is on {owner[name]} too")
                    owner[name] = key
            if len(owner) != len(joints):
                missing = [j for j in joints if j not in owner]
                raise ValueError(f"buses: no bus drives {', '.join(missing)}")
            wires = [(b.kind, family_of(b).wire(b)) for _, b, _ in sections]
            if len(set(wires)) != len(wires):
                raise ValueError("buses: two entries name the same wire (channel or device):"
                                 " make them one bus")
        motors = self.sim.robot.motors if self.sim is not None else None
        if motors is not None and len(motors) != len(joints):
            raise ValueError(f"sim.robot.motors has {len(motors)} entries, robot.joints has"
                             f" {len(joints)}")
        for key, bus, names in sections:
            if len(bus.ids) != len(names):
                raise ValueError(f"{key}.ids has {len(bus.ids)} entries for {len(names)} joints")
            # each wire must carry a read and a write of its motors every tick
            try:
                check_budget(bus, len(names), self.follower.hz)
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
        return self


# Keys that can change on a running follower through the control socket.
TUNABLES = frozenset(
    {
        "follower.blend_ms",
        "follower.residual",
        "follower.residual_max",
        "follower.residual_filter_ms",
        "follower.hold_decel",
        "follower.plan_timeout_ms",
        "follower.chunk_strategy",
    }
)
