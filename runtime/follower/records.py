"""What the follower process publishes and leaves behind, typed once here beside its writer
(runtime/follower/process.py): its health, its telemetry (decimated, on `telemetry-follower`)
and its summary (`follower-summary.json` in the run dir at exit). `duet status`, `duet top`,
the recorder and `duet run`'s summary import these types, so a key one side renames is a type
error on the other. Percentile blocks are {"p50": ..., "p99": ..., "max": ...} in the unit
their key names; arrays travel packed (runtime/ipc/messages.py `pack_array`)."""

from __future__ import annotations

from typing import Any, TypedDict


class FollowerHealth(TypedDict):
    ok: bool
    problems: list[str]  # why not ok, each naming its threshold
    achieved_hz: float  # over the last second
    miss_ratio: float  # deadline misses over the last second


class BusCounts(TypedDict, total=False):
    reads: int
    writes: int
    errors: int
    retries: int
    crc_errors: int
    timeouts: int
    dropped_frames: dict[str, int]  # frames no motor could have sent, by reason


class SafetyCounts(TypedDict, total=False):
    faults: int
    clamped_commands: int
    estops: int
    last_reason: str | None


class FollowerTelemetry(TypedDict):
    source: str  # "follower"
    mode: str  # runtime/follower/safety.py Mode name
    fault_reason: str | None  # while latched in FAULT/ESTOP
    health: FollowerHealth
    target_hz: float
    achieved_hz: float
    ticks: int
    deadline_misses: int
    period_jitter_us: dict[str, float]
    tick_compute_us: dict[str, float]
    plan_age_ms: float | None  # since the newest plan's observation; None before the first
    plan_delivery_us: dict[str, float]  # planner send -> follower take
    plans: int
    dropped_messages: dict[str, int]  # by reason
    torque_on: bool
    bus: BusCounts
    safety: SafetyCounts
    joint_names: list[str]
    q: dict[str, Any]  # packed float array [joints]
    tracking_error: dict[str, Any]  # packed float array [joints], rad


class FollowerSummary(TypedDict):
    final_mode: str
    final_reason: str | None
    target_hz: float
    achieved_hz: float
    ticks: int
    deadline_misses: int
    period_jitter_us: dict[str, float]  # p50, p99, p999, max
    tick_compute_us: dict[str, float]
    bus_read_us: dict[str, float]
    bus_write_us: dict[str, float]
    logic_us: dict[str, float]  # between the bus read and the write
    mode_counts: dict[str, int]  # ticks in each mode
    first_track_ns: int | None  # monotonic time of the first tracked command
    plan_delivery_us: dict[str, float]
    plans_received: int
    dropped_messages: dict[str, int]
    bus: BusCounts
    safety: SafetyCounts
    max_rss_mb: float | None
