"""Typed configuration: YAML files layered (robot < site < --set), validated by pydantic.

An invalid config is rejected with the file, the key path and the reason; nothing starts.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    model_validator,
)

from drivers.families import FAMILIES, check_budget, family_of
from drivers.mit_dialects import DIALECTS, dialect_class


class ConfigError(Exception):
    """A config that cannot be used. The message names file, key and reason."""


class _Strict(BaseModel):
    # allow_inf_nan=False: every number here can reach the motor path; +-inf and NaN never do.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


MAX_FILE_BYTES = 1 << 20
MAX_NODES = 100_000
MAX_DEPTH = 32


class Limits(_Strict):
    position_min: list[float]
    position_max: list[float]
    # Strictly positive: a zero or negative limit would invert the safety filter's clip.
    velocity_max: list[PositiveFloat]  # rad/s
    accel_max: list[PositiveFloat]  # rad/s^2
    effort_max: list[PositiveFloat] | None = None  # N·m, torque modes only
    # a measured position this far outside [position_min, position_max] is a FAULT
    state_margin: float = Field(0.15, ge=0, le=3.2)
    # plans whose waypoints leave the position range by more than this are dropped
    plan_margin: float = Field(0.3, ge=0, le=3.2)


class RobotConfig(_Strict):
    name: str
    joints: list[str] = Field(min_length=1)
    limits: Limits

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
    kind: Literal["dynamixel"] = "dynamixel"
    device: str  # serial device; "sim" = the pty the sim prints
    baudrate: int = Field(4_000_000, gt=0)
    ids: list[int]
    # encoder tick of each joint's zero and its direction (+1/-1)
    zero_ticks: list[int] | None = None
    direction: list[int] | None = None
    timeout_ms: float = Field(5.0, gt=0, le=1000)
    retries: int = Field(1, ge=0, le=10)
    return_delay_us: float = Field(0.0, ge=0, le=508)
    # the robot joints this bus drives, in `ids` order (required under `buses:`)
    joints: list[str] | None = None


class MitMotorModel(_Strict):
    """Ranges of the 16/12-bit MIT-mode fields, per motor model (positive and finite)."""

    p_max: float = Field(gt=0, le=1e4)  # rad, position range is [-p_max, p_max]
    v_max: float = Field(gt=0, le=1e4)  # rad/s
    t_max: float = Field(gt=0, le=1e4)  # N·m
    kp_max: float = Field(500.0, gt=0, le=1e5)
    kd_max: float = Field(5.0, gt=0, le=1e4)


class CanBusConfig(_Strict):
    kind: Literal["mit_can"] = "mit_can"
    # wire dialect of the motors (drivers/mit_dialects.py): generic (Katz firmware),
    # damiao, cubemars, myactuator
    dialect: str = "generic"
    interface: str = "socketcan"  # any python-can interface name
    channel: str = "can0"
    bitrate: int = Field(1_000_000, gt=0)  # nominal (arbitration) rate
    fd: bool = False  # CAN FD frames with bit-rate switching (Damiao)
    data_bitrate: int = Field(5_000_000, gt=0)  # FD data phase
    ids: list[int]
    master_ids: list[int] | None = None  # reply ids, when they differ from `ids`
    model: MitMotorModel
    kp: list[float]
    kd: list[float]
    timeout_ms: float = Field(2.0, gt=0, le=1000)
    direction: list[int] | None = None
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


BusConfig = DynamixelBusConfig | CanBusConfig


class RealtimeConfig(_Strict):
    sched_fifo_priority: int = Field(0, ge=0, le=99)  # 0 = do not ask
    cpu: int | None = None  # pin the follower to this core
    mlockall: bool = False


class DeadlineStorm(_Strict):
    misses: int = Field(50, gt=0, le=100_000)
    window_ticks: int = Field(500, gt=0, le=100_000)


class Health(_Strict):
    """What `duet status` calls unhealthy, over the follower's last second."""

    max_miss_ratio: float = Field(0.005, ge=0, le=1)  # deadline misses / ticks
    min_rate_ratio: float = Field(0.99, ge=0, le=1)  # achieved / target rate


class FollowerConfig(_Strict):
    hz: float = Field(500.0, gt=0, le=2000)
    blend_ms: float = Field(80.0, ge=0, le=2000)  # tunable
    chunk_strategy: Literal["blend", "broker", "average", "switch"] = "blend"
    # no plan from an observation newer than this -> HOLD; an older plan is never executed
    plan_timeout_ms: float = Field(500.0, gt=0, le=10_000)
    residual: bool = True  # tunable
    residual_max: float = Field(0.05, ge=0, le=1.0)  # rad, tunable
    # Low-pass on the residual, tunable. 50 ms: the reference follower's tick-to-tick output
    # steps then rarely exceed the command acceleration limit (20 ms: clamps on ~half the
    # ticks at 100 rad/s^2), for ~10 % more tracking error (`duet eval`, README).
    residual_filter_ms: float = Field(50.0, ge=0, le=10_000)
    hold_decel: float = Field(4.0, gt=0, le=1000)  # rad/s^2 when braking to a hold
    bus_error_threshold: int = Field(5, gt=0, le=10_000)  # failed transactions in a row -> FAULT
    fault_action: Literal["hold", "torque_off"] = "hold"
    stop_action: Literal["hold", "torque_off"] = "hold"  # on SIGTERM
    deadline_storm: DeadlineStorm = DeadlineStorm()
    health: Health = Health()
    realtime: RealtimeConfig = RealtimeConfig()
    spin_us: float = Field(200.0, ge=0, le=5000)  # busy-wait this long before each deadline
    state_pub_every: int = Field(1, gt=0, le=10_000)  # publish state every N ticks
    telemetry_hz: float = Field(20.0, gt=0, le=100)


class CameraConfig(_Strict):
    """One robot camera. A `sim` camera is the sim's MuJoCo camera of the same name."""

    kind: Literal["sim", "v4l2"] = "sim"
    device: str = "/dev/video0"
    width: int = Field(96, gt=0, le=8192)
    height: int = Field(96, gt=0, le=8192)
    fps: float = Field(15.0, gt=0, le=1000)
    stale_ms: float = Field(500.0, gt=0, le=60_000)


TCP_ENDPOINT = r"^tcp://[^\s/:]+:[0-9]{1,5}$"


class RemoteConfig(_Strict):
    """The robot's side of an off-board planner: the planner process relays state, frames
    and task to the planner server at `endpoint` and its plans back to the follower."""

    endpoint: str = Field(pattern=TCP_ENDPOINT)  # tcp://HOST:PORT of `duet planner --listen`
    server_key: str | None = None  # the server's public certificate (NAME.key)
    robot_key: str | None = None  # this robot's secret certificate (NAME.key_secret, 0600)
    insecure: bool = False  # plaintext TCP, no authentication: `duet doctor` flags it
    jpeg_quality: int = Field(90, ge=10, le=100)
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
    replicas: int = Field(1, ge=1, le=1024)
    gpus_per_replica: float = Field(0.0, ge=0, le=8)
    cpus_per_replica: float = Field(1.0, gt=0, le=256)
    batch_wait_ms: float = Field(2.0, ge=0, le=1000)  # @serve.batch's batch_wait_timeout_s


class ServeConfig(_Strict):
    """`duet planner --listen tcp://HOST:PORT`: this host plans for robots over the network."""

    listen: str | None = Field(None, pattern=TCP_ENDPOINT)
    key: str | None = None  # the server's secret certificate (NAME.key_secret, 0600)
    allow: str | None = None  # a directory of the admitted robots' public keys (*.key)
    insecure: bool = False  # plaintext, anyone who reaches the port: `duet doctor` flags it
    rate_hz: float = Field(20.0, gt=0, le=1000)  # the most observations served per robot
    max_robots: int = Field(64, ge=1, le=4096)
    max_frame_bytes: int = Field(1 << 20, gt=0, le=16 << 20)
    max_frame_pixels: int = Field(4096 * 4096, gt=0, le=1 << 26)
    engine: Literal["local", "ray"] = "local"
    ray: RayServeConfig = RayServeConfig()

    @model_validator(mode="after")
    def _keys_unless_insecure(self) -> ServeConfig:
        if not self.insecure and (self.key is None or self.allow is None):
            raise ValueError("key and allow are required (`duet keys generate`); plaintext "
                             "only with insecure: true")
        return self


class PlannerConfig(_Strict):
    hz: float = Field(5.0, gt=0, le=50)
    # The robot's cameras by name; the bundle's contract says which it reads.
    cameras: dict[str, CameraConfig] = Field(default_factory=lambda: {"scene": CameraConfig()})
    # Where instructions come from: `operator` (`duet task`, the task socket) or `sim` (the
    # sim's episodes). `instruction` is the task at start-up (empty: idle until one is set).
    task_source: Literal["operator", "sim"] = "operator"
    instruction: str = Field("", max_length=1000)
    threads: int = Field(1, ge=1, le=64)
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
                raise ValueError(f"{key} lists a provider twice: {names}")
        return self


class BundleConfig(_Strict):
    path: str
    public_key: str | None = None  # ed25519 public key file; when set, a signature is required
    engine: Literal["onnxruntime", "tensorrt"] = "onnxruntime"
    # TensorRT plans, built on the robot by `duet engines build`; root-owned (engines are code).
    # ONNX Runtime's TensorRT engines go in its onnxruntime/ folder (built by the planner).
    engine_cache: str = "/var/lib/duet/engines"
    onnxruntime: OnnxRuntimeConfig = Field(default_factory=OnnxRuntimeConfig)


class SimConfig(_Strict):
    enabled: bool = True
    seed: int = 0
    episode_timeout_s: float = Field(12.0, gt=0)
    two_step_fraction: float = Field(0.5, ge=0, le=1)
    # two-target instructions: "touch A, then B" or "touch B after A" (sim/task.py PHRASINGS)
    phrasing: Literal["then", "after"] = "then"
    camera_hz: float = Field(10.0, gt=0)
    physics_hz: float = Field(1000.0, gt=0)
    transport: Literal["serial", "can"] = "serial"
    # SCHED_FIFO priority of the emulated servos' serving thread (0 = don't ask): a real
    # servo answers in microseconds whatever the host is doing
    rt_priority: int = Field(0, ge=0, le=99)


class RecorderConfig(_Strict):
    enabled: bool = False
    dir: str = "/var/lib/duet/recordings"
    budget_mb: float = Field(2048.0, gt=0)
    ring_s: float = Field(30.0, gt=0)


class AccessConfig(_Strict):
    """Who may use the ipc sockets (runtime/ipc/access.py): checked by the kernel's peer
    credentials, no keys on one host."""

    planner_user: str | None = None  # sends plans; None = the follower's own user
    operator_group: str | None = "duet"  # status, estop, task; root and the service user: all


class DuetConfig(_Strict):
    robot: RobotConfig
    # one bus for every joint, or `buses`: one per limb, each naming its `joints`
    bus: BusConfig | None = Field(None, discriminator="kind")
    buses: list[Annotated[BusConfig, Field(discriminator="kind")]] | None = Field(
        None, min_length=1)
    follower: FollowerConfig = FollowerConfig()
    planner: PlannerConfig = PlannerConfig()
    bundle: BundleConfig
    run_dir: str = "/run/duet"
    sim: SimConfig | None = None
    recorder: RecorderConfig = RecorderConfig()
    access: AccessConfig = AccessConfig()

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


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    """Read one YAML layer; every way it can fail is a ConfigError naming the file."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    return parse_yaml(raw, path)


def parse_yaml(raw: bytes, path: str | Path) -> dict[str, Any]:
    """One YAML layer from its bytes (`path` names it in errors)."""
    if len(raw) > MAX_FILE_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes; a config is at most {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except (yaml.YAMLError, ValueError) as exc:  # ValueError: an int of > 4300 digits
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    check_plain(data, str(path))
    return data


def validate(merged: dict[str, Any], layers: list[tuple[str, dict[str, Any]]]) -> DuetConfig:
    """The merged layers as a DuetConfig; ConfigError naming each key's layer and reason."""
    try:
        return DuetConfig.model_validate(merged)
    except (OverflowError, RecursionError) as exc:
        raise ConfigError(f"invalid config: {exc.__class__.__name__}: {exc}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            # drop the union tag pydantic inserts into the location of discriminated unions
            loc = tuple(p for p in err["loc"] if p not in FAMILIES)
            key = ".".join(str(p) for p in loc) or "<root>"
            hint = ""
            if err["type"] == "extra_forbidden":
                near = close_keys(key)
                hint = f" (did you mean {' or '.join(near)}?)" if near else ""
            lines.append(f"{_origin(loc, layers)}: {key}: {err['msg']}{hint}")
        raise ConfigError("invalid config:\n  " + "\n  ".join(lines)) from None


def check_plain(data: Any, where: str) -> None:
    """A config is plain data: mappings with string keys, lists, strings, numbers, bools,
    null; bounded in depth and size (YAML aliases can make a small file a huge tree)."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    nodes = 0
    while stack:
        node, key, depth = stack.pop()
        nodes += 1
        if nodes > MAX_NODES or depth > MAX_DEPTH:
            raise ConfigError(f"{where}: too large or nested too deeply (at {key or '<root>'})")
        if isinstance(node, dict):
            for k, v in node.items():
                if not isinstance(k, str):
                    raise ConfigError(f"{where}: {key or '<root>'}: key {k!r} is not a string")
                stack.append((v, f"{key}.{k}" if key else k, depth + 1))
        elif isinstance(node, list):
            stack.extend((v, f"{key}[{i}]", depth + 1) for i, v in enumerate(node))
        elif node is not None and not isinstance(node, (str, int, float, bool)):
            raise ConfigError(f"{where}: {key}: {type(node).__name__} values are not allowed "
                              f"(a date or timestamp? quote it)")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a","b","c"], parsed YAML value)."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE")
    key, raw = item.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {item!r}: empty key segment")
    try:
        value = yaml.safe_load(raw)
    except (yaml.YAMLError, RecursionError, ValueError) as exc:
        raise ConfigError(f"--set {item!r}: value is not valid YAML: {exc}") from None
    check_plain(value, f"--set {key}")
    return parts, value


def set_path(data: dict[str, Any], parts: list[str], value: Any) -> None:
    """data[a][b][c] = value for parts [a, b, c], creating mappings on the way."""
    node = data
    for part in parts[:-1]:
        nxt = node.setdefault(part, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts)}: {part!r} is not a mapping")
        node = nxt
    node[parts[-1]] = value


def _origin(key_path: tuple[Any, ...], layers: list[tuple[str, dict[str, Any]]]) -> str:
    """Which layer last set this key (so the error names the right file)."""
    for name, layer in reversed(layers):
        node: Any = layer
        found = True
        for part in key_path:
            in_dict = isinstance(node, dict) and part in node
            in_list = isinstance(node, list) and isinstance(part, int) and part < len(node)
            if in_dict or in_list:
                node = node[part]
            else:
                found = False
                break
        if found:
            return name
    return layers[0][0] if layers else "<config>"


# Config values that are file system paths: a relative one is relative to the file that set it
# (the --set layer: to the working directory), so a config means the same from any folder.
PATH_KEYS = (("bundle", "path"), ("bundle", "public_key"), ("bundle", "engine_cache"),
             ("recorder", "dir"), ("run_dir",))

Layer = tuple[str, dict[str, Any], Path]  # (name for errors, data, folder its paths are from)


def _anchor_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    out = copy.deepcopy(data)
    for key in PATH_KEYS:
        node: Any = out
        for part in key[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        value = node.get(key[-1]) if isinstance(node, dict) else None
        if isinstance(value, str) and value and not Path(value).is_absolute():
            # normpath, not resolve(): a `current` symlink must stay a symlink
            node[key[-1]] = os.path.normpath(base / value)
    return out


def file_layer(path: str | Path) -> Layer:
    path = Path(path)
    return (str(path), _read_yaml(path), Path(os.path.abspath(path)).parent)


def override_layer(overrides: list[str]) -> Layer:
    cli: dict[str, Any] = {}
    for item in overrides:
        parts, value = parse_override(item)
        set_path(cli, parts, value)
    return ("--set", cli, Path.cwd())


def load_config(
    path: str | Path,
    site: str | Path | None = None,
    overrides: list[str] | None = None,
) -> DuetConfig:
    """Load `path`, layer the site file and `--set` overrides on top, validate."""
    layers = [file_layer(path)]
    if site is not None and Path(site).exists():
        layers.append(file_layer(site))
    if overrides:
        layers.append(override_layer(overrides))
    return validate_layers(layers)


def validate_layers(layers: list[Layer]) -> DuetConfig:
    """Merge the layers (later wins) and validate; errors name the layer that set the key."""
    anchored = [(name, _anchor_paths(data, base)) for name, data, base in layers]
    merged: dict[str, Any] = {}
    for _, layer in anchored:
        merged = _deep_merge(merged, layer)
    return validate(merged, anchored)


def known_keys(model: type[BaseModel] | None = None, prefix: str = "") -> list[str]:
    """Every key path of the schema, e.g. `follower.realtime.cpu` (a list is one key)."""
    out = []
    for name, field in (model or DuetConfig).model_fields.items():
        path = f"{prefix}{name}"
        out.append(path)
        for sub in _models_in(field.annotation):
            out += known_keys(sub, f"{path}.")
    return out


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The models a field holds directly (through unions and Annotated, not lists)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if getattr(annotation, "__origin__", None) is list:
        return []
    return [m for arg in getattr(annotation, "__args__", ()) or () for m in _models_in(arg)]


def close_keys(key: str, n: int = 2) -> list[str]:
    """Schema keys close to a mistyped `key` (difflib), for "did you mean"."""
    import difflib

    return difflib.get_close_matches(key, sorted(set(known_keys())), n=n, cutoff=0.75)


def config_to_dict(cfg: DuetConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
