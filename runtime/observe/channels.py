"""What duet's observers see: the topics, their JSON schemas (joint names and units in them)
and the conversion of a wire message into one JSON record. The flight recorder (MCAP) and the
live view (Foxglove WebSocket) both use this module, so a recording and the live view have the
same channels and schemas.

Clocks: duet stamps messages with CLOCK_MONOTONIC (one clock for the processes on a host).
A record's `log_time` and every `timestamp` field are wall-clock (UTC ns) so people and tools
can line them up with the world; the monotonic stamp is kept in each record as `t_mono_ns`.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zmq

from runtime.ipc import endpoints
from runtime.ipc.messages import MessageError, decode, unpack_array
from runtime.ipc.sockets import open_socket
from runtime.observe.telemetry_view import to_jsonable

log = logging.getLogger("duet.channels")

_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_OBJ: dict[str, Any] = {"type": "object"}
_TIME = {"type": "object", "description": "wall clock (UTC)",
         "properties": {"sec": _INT, "nsec": _INT}}
_MONO = {"type": "integer", "description": "CLOCK_MONOTONIC ns of the sender (send time)"}


def _floats(unit: str, joints: list[str]) -> dict[str, Any]:
    order = ", ".join(f"[{i}] {n}" for i, n in enumerate(joints))
    return {"type": "array", "items": _NUM, "description": f"{unit}; {order}"}


def _schema(title: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"title": title, "type": "object",
            "properties": {"timestamp": _TIME, "t_mono_ns": _MONO, **props}}


def schemas(joints: list[str]) -> dict[str, tuple[str, dict[str, Any]]]:
    """topic -> (schema name, JSON schema) for this robot's joints."""
    return {
        "/follower/state": ("duet.State", _schema("duet.State", {
            "q": _floats("joint position, rad", joints),
            "dq": _floats("joint velocity, rad/s", joints),
            "effort": _floats("joint effort, N·m (Dynamixel: current × torque constant)",
                              joints),
            "q_cmd": _floats("the follower's command, rad", joints),
            "mode": _STR, "t_read_ns": {"type": "integer", "description":
                                        "CLOCK_MONOTONIC ns of the bus read"},
            "seq": _INT})),
        "/planner/plan": ("duet.Plan", _schema("duet.Plan", {
            "waypoints": {"type": "array", "items": _floats("rad", joints),
                          "description": "joint targets at t_obs + (k+1)·dt_s, rad"},
            "dt_s": {"type": "number", "description": "s between waypoints"},
            "t_obs_ns": {"type": "integer", "description": "CLOCK_MONOTONIC ns of the "
                         "observation the plan was computed from"},
            "latency_ms": {"type": "number", "description": "observation to plan, ms"}})),
        "/follower/telemetry": ("duet.FollowerTelemetry", _schema("duet.FollowerTelemetry", {
            "mode": _STR, "fault_reason": {"type": ["string", "null"]}, "health": _OBJ,
            "achieved_hz": {"type": "number", "description": "Hz"},
            "period_jitter_us": {**_OBJ, "description": "µs"},
            "tick_compute_us": {**_OBJ, "description": "µs"}, "bus": _OBJ, "safety": _OBJ,
            "joint_names": {"type": "array", "items": _STR},
            "q": _floats("rad", joints),
            "tracking_error": _floats("reference minus measured, rad", joints)})),
        "/planner/telemetry": ("duet.PlannerTelemetry", _schema("duet.PlannerTelemetry", {
            "status": _STR, "plans": _INT, "latency_ms": {**_OBJ, "description": "ms"},
            "instruction": {"type": ["string", "null"]}})),
        "/shadow/telemetry": ("duet.ShadowReport", _schema("duet.ShadowReport", {
            "candidate": _STR, "active": _STR, "plans": _INT, "skipped": _INT,
            "latency_ms": {**_OBJ, "description": "the candidate's plan, ms"},
            "divergence_rad": {**_OBJ, "description": "|candidate - active| over the same "
                               "observations, rad: mean, p95, max, per_joint"}})),
        "/sim/task": ("duet.Task", _schema("duet.Task", {"episode": _INT,
                                                         "instruction": _STR})),
        "/sim/episode": ("duet.EpisodeResult", _schema("duet.EpisodeResult", {
            "episode": _INT, "instruction": _STR, "success": {"type": "boolean"},
            "reason": _STR, "duration_s": {"type": "number", "description": "s"}})),
        # Foxglove's well-known raw image schema, so viewers show the camera.
        "/sim/frame": ("foxglove.RawImage", {
            "title": "foxglove.RawImage", "type": "object", "properties": {
                "timestamp": _TIME, "t_mono_ns": _MONO, "frame_id": _STR, "width": _INT,
                "height": _INT, "encoding": _STR, "step": _INT,
                "data": {"type": "string", "contentEncoding": "base64"}}}),
    }


# endpoint -> {message type: topic}. The planner publishes its plans on its telemetry socket
# too (the plan socket itself belongs to the follower and admits only the planner).
SOURCES: list[tuple[Callable[[str], str], dict[str, str], int]] = [
    (endpoints.state, {"state": "/follower/state"}, endpoints.MAX_STATE_BYTES),
    (lambda d: endpoints.telemetry(d, "follower"), {"telemetry": "/follower/telemetry"},
     endpoints.MAX_TELEMETRY_BYTES),
    (lambda d: endpoints.telemetry(d, "planner"), {"telemetry": "/planner/telemetry",
                                                   "plan": "/planner/plan"},
     endpoints.MAX_TELEMETRY_BYTES),
    (lambda d: endpoints.telemetry(d, "shadow"), {"telemetry": "/shadow/telemetry"},
     endpoints.MAX_TELEMETRY_BYTES),
    (endpoints.sim, {"frame": "/sim/frame", "task": "/sim/task", "episode": "/sim/episode"},
     endpoints.MAX_SIM_BYTES),
]


@dataclass(frozen=True)
class Record:
    topic: str
    log_time_ns: int  # wall clock of the sender's stamp (what MCAP tools and Foxglove show)
    sequence: int
    data: bytes  # JSON


class WallClock:
    """CLOCK_MONOTONIC ns -> wall-clock ns, re-anchored every second (NTP may step the wall)."""

    def __init__(self) -> None:
        self._offset = 0
        self._anchored = -(10**12)

    def __call__(self, mono_ns: int) -> int:
        now = time.monotonic_ns()
        if now - self._anchored > 10**9:
            self._offset = time.time_ns() - time.monotonic_ns()
            self._anchored = now
        return mono_ns + self._offset


def _stamp(wall_ns: int) -> dict[str, int]:
    return {"sec": wall_ns // 10**9, "nsec": wall_ns % 10**9}


def _frame(msg: dict[str, Any], wall_ns: int) -> dict[str, Any]:
    image = unpack_array(msg.get("image"), "image")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype.kind != "u":
        raise MessageError("shape", f"frame image shape {list(image.shape)}")
    return {"frame_id": str(msg.get("camera") or "camera"), "width": int(image.shape[1]),
            "height": int(image.shape[0]), "encoding": "rgb8", "step": int(image.shape[1]) * 3,
            "data": base64.b64encode(image.tobytes()).decode()}


def to_record(topic: str, msg: dict[str, Any], wall: WallClock) -> Record:
    """One decoded wire message -> its JSON record, stamped on the wall clock."""
    mono = int(msg.get("capture_t_ns") or msg["t_ns"]) if topic == "/sim/frame" \
        else int(msg["t_ns"])
    wall_ns = wall(mono)
    if topic == "/sim/frame":
        body = _frame(msg, wall_ns)
    else:
        body = {k: v for k, v in to_jsonable(msg).items() if k not in ("v", "type", "t_ns")}
    body = {"timestamp": _stamp(wall_ns), "t_mono_ns": mono, **body}
    return Record(topic, wall_ns, int(msg["seq"]), json.dumps(body, separators=(",", ":"),
                                                              allow_nan=False).encode())


class ChannelSubscriber:
    """SUB sockets on every source of SOURCES. `drain` decodes what waits on one socket and
    hands (topic, message) on; anything malformed or unexpected is counted by reason, never
    raised (the recorder and the live view must outlive any message)."""

    def __init__(self, run_dir: str, rcvhwm: int = 20000) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.socks: dict[zmq.Socket[bytes], dict[str, str]] = {}
        self.received = 0
        self.rejected: Counter[str] = Counter()
        for endpoint_of, topics, max_bytes in SOURCES:
            sock = open_socket(self.ctx, zmq.SUB, max_bytes)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, rcvhwm)  # state at up to 1 kHz: never conflate here
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint_of(run_dir))  # works before the publisher binds
            self.socks[sock] = topics

    def register(self, poller: zmq.Poller) -> None:
        for sock in self.socks:
            poller.register(sock, zmq.POLLIN)

    def drain(self, sock: zmq.Socket[bytes], handle: Callable[[str, dict[str, Any]], None],
              limit: int = 1000) -> None:
        """Up to `limit` waiting messages (a backlog never keeps the caller from its other
        duties: flushing, the control socket, a stop request)."""
        topics = self.socks[sock]
        for _ in range(limit):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                msg = decode(frame)
                topic = topics.get(msg["type"])
                if topic is None:
                    raise MessageError("type", f"unexpected type {msg['type']!r}")
                handle(topic, msg)
                self.received += 1
            except MessageError as exc:
                self.rejected[exc.kind] += 1
            except Exception as exc:  # never let one message end the loop
                self.rejected[type(exc).__name__] += 1
                log.error("message dropped: %r", exc)

    def close(self) -> None:
        for sock in self.socks:
            sock.close(linger=0)
