"""Flight recorder: subscribes to state, plans, telemetry and (downsampled) sim frames and
writes MCAP.

- Always on: an in-memory ring of the last `recorder.ring_s` seconds. When the follower's
  telemetry enters FAULT or ESTOP the ring is written to incidents/<time>-<mode>.mcap and
  recording continues into that file for `post_s` seconds, so both sides of the event are kept.
- Named episodes (`duet record start NAME` / `stop`) for data collection: episodes/NAME.mcap.
- Optional continuous recording (`--continuous`), rotated into segments.
- A disk budget (`recorder.budget_mb`): the oldest continuous segments, then the oldest
  incidents, are deleted to stay under it; episodes are never deleted automatically.

Control: ipc://{run_dir}/recorder (runtime.rpc), {cmd: start|stop|status, args}.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import signal
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

from runtime import endpoints
from runtime.access import OPERATOR
from runtime.deploy.mcap_sink import McapSink, Record
from runtime.deploy.telemetry_view import to_jsonable
from runtime.messages import MessageError, decode, unpack_array
from runtime.rpc import Command, RequestError, bind_server

log = logging.getLogger("duet.recorder")

ALARM_MODES = ("FAULT", "ESTOP")
EPISODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


_ANY_OBJECT: dict[str, Any] = {"type": "object"}
_FLOATS: dict[str, Any] = {"type": "array", "items": {"type": "number"}}


def _schema(title: str, props: dict[str, Any]) -> dict[str, Any]:
    return {"title": title, "type": "object", "properties": props}


SCHEMAS: dict[str, tuple[str, dict[str, Any]]] = {
    "/follower/state": ("duet.State", _schema("duet.State", {
        "q": _FLOATS, "dq": _FLOATS, "effort": _FLOATS, "mode": {"type": "string"},
        "t_ns": {"type": "integer"}, "seq": {"type": "integer"}})),
    "/planner/plan": ("duet.Plan", _schema("duet.Plan", {
        "waypoints": {"type": "array", "items": _FLOATS}, "dt_s": {"type": "number"},
        "t_obs_ns": {"type": "integer"}, "latency_ms": {"type": "number"}})),
    "/follower/telemetry": ("duet.FollowerTelemetry", _schema("duet.FollowerTelemetry", {
        "mode": {"type": "string"}, "achieved_hz": {"type": "number"},
        "period_jitter_us": _ANY_OBJECT, "tick_compute_us": _ANY_OBJECT, "bus": _ANY_OBJECT,
        "safety": _ANY_OBJECT, "q": _FLOATS, "tracking_error": _FLOATS})),
    "/planner/telemetry": ("duet.PlannerTelemetry", _schema("duet.PlannerTelemetry", {
        "status": {"type": "string"}, "plans": {"type": "integer"},
        "latency_ms": _ANY_OBJECT, "instruction": {"type": "string"}})),
    # Foxglove's well-known raw image schema, so viewers show the camera.
    "/sim/frame": ("foxglove.RawImage", {
        "title": "foxglove.RawImage", "type": "object", "properties": {
            "timestamp": {"type": "object", "properties": {
                "sec": {"type": "integer"}, "nsec": {"type": "integer"}}},
            "frame_id": {"type": "string"}, "width": {"type": "integer"},
            "height": {"type": "integer"}, "encoding": {"type": "string"},
            "step": {"type": "integer"},
            "data": {"type": "string", "contentEncoding": "base64"}}}),
}

# endpoint -> {message type: topic}. The planner publishes its plans on its telemetry socket
# too (the plan socket itself belongs to the follower and admits only the planner).
SOURCES: list[tuple[Callable[[str], str], dict[str, str]]] = [
    (endpoints.state, {"state": "/follower/state"}),
    (lambda d: endpoints.telemetry(d, "follower"), {"telemetry": "/follower/telemetry"}),
    (lambda d: endpoints.telemetry(d, "planner"), {"telemetry": "/planner/telemetry",
                                                   "plan": "/planner/plan"}),
    (endpoints.sim, {"frame": "/sim/frame"}),
]


def frame_to_json(msg: dict[str, Any]) -> dict[str, Any]:
    image = unpack_array(msg.get("image"), "image")
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype.kind != "u":
        raise MessageError("shape", f"frame image shape {list(image.shape)}")
    t = int(msg.get("capture_t_ns") or msg["t_ns"])
    return {"timestamp": {"sec": t // 10**9, "nsec": t % 10**9}, "frame_id": "camera",
            "width": int(image.shape[1]), "height": int(image.shape[0]), "encoding": "rgb8",
            "step": int(image.shape[1]) * 3, "data": base64.b64encode(image.tobytes()).decode()}


def to_record(topic: str, msg: dict[str, Any]) -> Record:
    body = frame_to_json(msg) if topic == "/sim/frame" else to_jsonable(msg)
    return Record(topic, time.time_ns(), int(msg["t_ns"]), int(msg["seq"]),
                  json.dumps(body, separators=(",", ":")).encode())


@dataclass
class Stats:
    received: int = 0
    rejected: int = 0
    frames_skipped: int = 0
    incidents: int = 0
    deleted_files: int = 0


class Recorder:
    def __init__(self, run_dir: str, out_dir: Path, ring_s: float, budget_mb: float,
                 metadata: dict[str, str], frame_hz: float = 2.0, post_s: float = 5.0,
                 continuous: bool = False, flush_s: float = 1.0) -> None:
        self.run_dir = run_dir
        self.out_dir = out_dir
        self.ring_ns = int(ring_s * 1e9)
        self.budget_bytes = int(budget_mb * 2**20)
        self.metadata = metadata
        self.frame_period_ns = int(1e9 / frame_hz) if frame_hz > 0 else None
        self.post_ns = int(post_s * 1e9)
        self.continuous = continuous
        self.flush_s = flush_s
        self.segment_bytes = max(1 << 20, min(256 << 20, self.budget_bytes // 8))
        self.ring: deque[Record] = deque()
        self.episode: McapSink | None = None
        self.incident: McapSink | None = None
        self.incident_until_ns = 0
        self.segment: McapSink | None = None
        self.last_mode: str | None = None
        self.last_frame_ns = 0
        self.stats = Stats()
        self.stop_requested = False
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.poller = zmq.Poller()
        self.subs: dict[zmq.Socket[bytes], dict[str, str]] = {}
        for endpoint_of, topics in SOURCES:
            sock = self.ctx.socket(zmq.SUB)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.RCVHWM, 20000)  # state at up to 1 kHz: never conflate here
            sock.setsockopt(zmq.SUBSCRIBE, b"")
            sock.connect(endpoint_of(run_dir))
            self.poller.register(sock, zmq.POLLIN)
            self.subs[sock] = topics
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # may start before the follower
        self.server = bind_server(self.ctx, endpoints.recorder(run_dir), {
            "start": Command(lambda a: {"path": str(self.start_episode(str(a.get("name", ""))))},
                             OPERATOR, "start a named episode"),
            "stop": Command(lambda a: self.stop_episode(), OPERATOR, "stop the episode"),
            "status": Command(lambda a: self.status(), OPERATOR, "recorder status"),
        })
        self.control = self.server.sock
        self.poller.register(self.control, zmq.POLLIN)

    # ------------------------------------------------------------------ files
    def _sink(self, path: Path, extra: dict[str, str]) -> McapSink:
        return McapSink(path, SCHEMAS, {**self.metadata, **extra}, flush_s=self.flush_s)

    def _stamp(self) -> str:
        return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")

    def start_episode(self, name: str) -> Path:
        if self.episode is not None:
            raise RequestError(f"episode {self.episode.path.stem!r} is recording; "
                               "stop it first")
        if not EPISODE_NAME.match(name):
            raise RequestError(f"episode name {name!r}: use letters, digits, '.', '_', '-'")
        path = self.out_dir / "episodes" / f"{name}.mcap"
        if path.exists():
            raise RequestError(f"episode {name!r} exists: {path}")
        if self._episodes_bytes() >= self.budget_bytes:
            raise RequestError(f"episodes alone fill the recorder budget "
                             f"({self.budget_bytes >> 20} MB): move them off the robot")
        self.episode = self._sink(path, {"kind": "episode", "name": name,
                                         "started": self._stamp()})
        log.info("episode=%s path=%s started", name, path)
        return path

    def stop_episode(self) -> dict[str, Any]:
        if self.episode is None:
            raise RequestError("no episode is recording")
        ep, self.episode = self.episode, None
        ep.close()
        log.info("episode=%s messages=%d stopped", ep.path.stem, ep.messages)
        self.enforce_budget()
        return {"path": str(ep.path), "messages": ep.messages, "bytes": ep.path.stat().st_size}

    def _open_incident(self, mode: str, now_ns: int) -> None:
        if self.incident is not None:  # already capturing: extend the window
            self.incident_until_ns = now_ns + self.post_ns
            return
        path = self.out_dir / "incidents" / f"{self._stamp()}-{mode}.mcap"
        self.incident = self._sink(path, {"kind": "incident", "mode": mode})
        for rec in self.ring:
            self.incident.write(rec)
        self.incident.maybe_flush(time.monotonic_ns())  # the ring is on disk right away
        self.incident_until_ns = now_ns + self.post_ns
        self.stats.incidents += 1
        log.warning("mode=%s incident=%s ring_messages=%d", mode, path, len(self.ring))

    def _close_incident(self) -> None:
        if self.incident is not None:
            self.incident.close()
            self.incident = None
            self.enforce_budget()

    def _rotate_segment(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment = None
            self.enforce_budget()
        self.segment = self._sink(self.out_dir / "continuous" / f"{self._stamp()}.mcap",
                                  {"kind": "continuous"})

    def _files(self, sub: str) -> list[Path]:
        folder = self.out_dir / sub
        return sorted(folder.glob("*.mcap"), key=lambda p: p.stat().st_mtime) \
            if folder.is_dir() else []

    def _episodes_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files("episodes"))

    def enforce_budget(self) -> None:
        """Delete the oldest closed continuous segments, then incidents, until under budget."""
        open_paths = {s.path for s in (self.episode, self.incident, self.segment) if s}
        candidates = [p for p in self._files("continuous") + self._files("incidents")
                      if p not in open_paths]
        total = sum(p.stat().st_size for sub in ("continuous", "incidents", "episodes")
                    for p in self._files(sub))
        for path in candidates:
            if total <= self.budget_bytes:
                break
            size = path.stat().st_size
            path.unlink()
            total -= size
            self.stats.deleted_files += 1
            log.info("budget deleted=%s bytes=%d", path, size)

    # ------------------------------------------------------------------ data
    def handle(self, topic: str, msg: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        if topic == "/sim/frame" and self.frame_period_ns is not None:
            if now - self.last_frame_ns < self.frame_period_ns:
                self.stats.frames_skipped += 1
                return
            self.last_frame_ns = now
        rec = to_record(topic, msg)
        self.ring.append(rec)
        while self.ring and rec.log_time_ns - self.ring[0].log_time_ns > self.ring_ns:
            self.ring.popleft()
        for sink in (self.episode, self.incident, self.segment):
            if sink is not None:
                sink.write(rec)
        if topic == "/follower/telemetry":
            mode = msg.get("mode")
            if mode in ALARM_MODES and mode != self.last_mode:
                self._open_incident(str(mode), now)
            self.last_mode = mode if isinstance(mode, str) else None

    def status(self) -> dict[str, Any]:
        return {"dir": str(self.out_dir), "episode": str(self.episode.path) if self.episode
                else None, "incident": str(self.incident.path) if self.incident else None,
                "ring_messages": len(self.ring), "received": self.stats.received,
                "rejected": self.stats.rejected, "incidents": self.stats.incidents,
                "deleted_files": self.stats.deleted_files, "last_mode": self.last_mode}

    def poll_once(self, timeout_ms: int = 100) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.control:
                self.server.serve_pending()
                continue
            topics = self.subs[sock]
            while True:
                try:
                    frame = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                try:
                    msg = decode(frame)
                    topic = topics.get(msg["type"])
                    if topic is None:
                        raise MessageError("type", f"unexpected type {msg['type']!r}")
                    self.handle(topic, msg)
                    self.stats.received += 1
                except MessageError:
                    self.stats.rejected += 1
                except Exception as exc:  # never let one message end the recording
                    self.stats.rejected += 1
                    log.error("message dropped: %r", exc)
        now = time.monotonic_ns()
        if self.incident is not None and now > self.incident_until_ns:
            self._close_incident()
        if self.continuous and (self.segment is None
                                or self.segment.size() > self.segment_bytes):
            self._rotate_segment()
        for sink in (self.episode, self.incident, self.segment):
            if sink is not None:
                sink.maybe_flush(now)

    def run(self, ready: Callable[[], object] = lambda: None,
            duration_s: float | None = None) -> None:
        end = None if duration_s is None else time.monotonic() + duration_s
        ready()
        while not self.stop_requested and (end is None or time.monotonic() < end):
            self.poll_once()

    def close(self) -> None:
        for sink in (self.episode, self.incident, self.segment):
            if sink is not None:
                sink.close()
        self.episode = self.incident = self.segment = None
        for sock in [*self.subs, self.control]:
            sock.close(linger=0)


def serve(run_dir: str, out_dir: Path, ring_s: float, budget_mb: float,
          metadata: dict[str, str], continuous: bool = False, frame_hz: float = 2.0,
          duration_s: float | None = None) -> int:
    """The recorder process (duet-recorder.service): until SIGTERM/SIGINT, then close files."""
    from runtime.notify import notifier as make_notifier

    rec = Recorder(run_dir, out_dir, ring_s, budget_mb, metadata, frame_hz=frame_hz,
                   continuous=continuous)

    def _stop(_signum: int, _frame: Any) -> None:
        rec.stop_requested = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    notifier = make_notifier()
    log.info("run_dir=%s dir=%s ring_s=%g budget_mb=%g started", run_dir, out_dir, ring_s,
             budget_mb)
    try:
        rec.run(lambda: notifier.notify("READY=1"), duration_s)
    finally:
        notifier.notify("STOPPING=1")
        rec.close()
    return 0
