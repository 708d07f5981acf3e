"""Flight recorder: subscribes to state, plans, telemetry, the sim's tasks and results and
(downsampled) camera frames, and writes MCAP (channels and schemas: runtime/observe/channels.py).

- Always on: an in-memory ring of the last `recorder.ring_s` seconds. When the follower's
  telemetry enters FAULT or ESTOP the ring is written to incidents/<time>-<MODE>.mcap (with the
  reason in its metadata) and recording continues into that file for `post_s` seconds, so both
  sides of the event are kept.
- Named episodes (`duet record start NAME` / `stop [--success|--fail]`) for data collection:
  episodes/NAME.mcap, with the instruction, bundle version and config hash at the start and
  the outcome (the operator's, else the sim's episode result) at the end.
- Optional continuous recording (`--continuous`), rotated into segments.
- Disk: the oldest continuous segments are deleted to stay under `recorder.budget_mb` and to
  keep `reserve_mb` free on the file system; incidents and episodes never are (an incident is
  why the recorder exists). The reserve is the incidents': below it, continuous recording
  stops (its messages are dropped, counted) while an incident may still write into it. A write
  that fails anyway (disk full) is counted and that file is closed with what it has (named in
  status); the recorder goes on. Status says when the disk is full and what was dropped.

Control: ipc://{run_dir}/recorder (runtime.ipc.rpc), {cmd: start|stop|status, args}.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import re
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import zmq

from runtime.config import DuetConfig, config_to_dict
from runtime.ipc import endpoints
from runtime.ipc.access import OPERATOR
from runtime.ipc.follower_mode import LATCHED_MODES
from runtime.ipc.rpc import Command, RequestError, bind_server
from runtime.ipc.signals import stop_on_signals
from runtime.observe.channels import ChannelSubscriber, Record, WallClock, schemas, to_record
from runtime.observe.mcap_sink import McapSink

log = logging.getLogger("duet.recorder")

EPISODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
ENOSPC_HEADROOM = 2 << 20  # freed on a full disk: two chunks and the summary
UNITS = "q rad, dq rad/s, effort N·m, times: log_time wall clock UTC ns, t_mono_ns monotonic"


@dataclass
class Stats:
    frames_skipped: int = 0
    incidents: int = 0
    deleted_files: int = 0
    write_errors: int = 0
    dropped: Counter[str] = field(default_factory=Counter)  # messages not written, by reason
    cut_short: list[str] = field(default_factory=list)  # files closed early by a full disk


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


class Recorder:
    def __init__(self, run_dir: str, out_dir: Path, ring_s: float, budget_mb: float,
                 metadata: dict[str, str], frame_hz: float = 2.0, post_s: float = 5.0,
                 continuous: bool = False, flush_s: float = 1.0,
                 joints: list[str] | None = None, reserve_mb: float = 64.0) -> None:
        self.run_dir = run_dir
        self.out_dir = out_dir
        self.ring_ns = int(ring_s * 1e9)
        self.budget_bytes = int(budget_mb * 2**20)
        self.reserve_bytes = int(reserve_mb * 2**20)
        self.metadata = metadata
        self.schemas = schemas(list(joints or []))
        self.channel_metadata = {"joints": ",".join(joints or []), "units": UNITS}
        self.frame_period_ns = int(1e9 / frame_hz) if frame_hz > 0 else None
        self.post_ns = int(post_s * 1e9)
        self.continuous = continuous
        self.flush_s = flush_s
        self.segment_bytes = max(1 << 20, min(256 << 20, self.budget_bytes // 8))
        self.wall = WallClock()
        self.ring: deque[Record] = deque()
        self.episode: McapSink | None = None
        self.episode_results: list[dict[str, Any]] = []  # the sim's, during the episode
        # every instruction heard during the episode, in order: the task it recorded is the
        # first (the one at stop may already be the next episode's)
        self.episode_instructions: list[str] = []
        self.incident: McapSink | None = None
        self.incident_until_ns = 0
        self.segment: McapSink | None = None
        self.last_mode: str | None = None
        self.instruction: str | None = None
        self.last_frame_ns = 0
        self.last_space_check_ns = 0
        self.disk_low = False  # free space below the reserve: continuous recording paused
        self.stats = Stats()
        self.stop_requested = False
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.poller = zmq.Poller()
        self.subs = ChannelSubscriber(run_dir)
        self.subs.register(self.poller)
        Path(run_dir).mkdir(parents=True, exist_ok=True)  # may start before the follower
        self.server = bind_server(self.ctx, endpoints.recorder(run_dir), {
            "start": Command(lambda a: {"path": str(self.start_episode(
                str(a.get("name", "")), a.get("task")))}, OPERATOR,
                "start a named episode (task: the instruction it is labelled with)"),
            "stop": Command(lambda a: self.stop_episode(a.get("success")), OPERATOR,
                            "stop the episode (success: true/false, the operator's outcome)"),
            "status": Command(lambda a: self.status(), OPERATOR, "recorder status"),
        })
        self.control = self.server.sock
        self.poller.register(self.control, zmq.POLLIN)

    # ------------------------------------------------------------------ files
    def _sink(self, path: Path, extra: dict[str, str]) -> McapSink:
        self.enforce_budget()
        return McapSink(path, self.schemas, {**self.metadata, **extra}, flush_s=self.flush_s,
                        channel_metadata=self.channel_metadata)

    def _stamp(self) -> str:
        return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")

    def start_episode(self, name: str, task: Any = None) -> Path:
        """`task`: the instruction set for this episode (`duet record start --task`); by
        default the planner's current one."""
        if task is not None and (not isinstance(task, str) or len(task) > 1000):
            raise RequestError("start: `task` must be text of at most 1000 characters")
        if task:
            self.instruction = task
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
        try:
            self.episode = self._sink(path, {"kind": "episode", "name": name,
                                             "started": _iso_now(),
                                             "instruction": self.instruction or ""})
        except OSError as exc:
            raise RequestError(f"cannot create {path}: {exc.strerror}") from None
        self.episode_results = []
        self.episode_instructions = [self.instruction] if self.instruction else []
        log.info("episode=%s path=%s started", name, path)
        return path

    def stop_episode(self, success: Any = None) -> dict[str, Any]:
        """Close the episode; its outcome: the operator's `success`, else the sim's result."""
        if self.episode is None:
            raise RequestError("no episode is recording")
        if success is not None and not isinstance(success, bool):
            raise RequestError("stop: `success` must be true or false")
        ep, self.episode = self.episode, None
        if success is not None:
            outcome, source = ("success" if success else "fail"), "operator"
        elif self.episode_results:
            ok = all(r.get("success") is True for r in self.episode_results)
            outcome, source = ("success" if ok else "fail"), "sim"
        else:
            outcome, source = "unknown", "none"
        self._safe(ep, lambda: ep.add_metadata("duet.outcome", {
            "outcome": outcome, "source": source, "stopped": _iso_now(),
            "instruction": self.episode_instructions[0] if self.episode_instructions else "",
            "instructions": json.dumps(self.episode_instructions),
            "sim_results": json.dumps(self.episode_results)}))
        self._safe(ep, ep.close)
        log.info("episode=%s messages=%d outcome=%s (%s) stopped", ep.path.stem, ep.messages,
                 outcome, source)
        self.enforce_budget()
        return {"path": str(ep.path), "messages": ep.messages, "outcome": outcome,
                "outcome_source": source,
                "bytes": ep.path.stat().st_size if ep.path.exists() else 0}

    def _open_incident(self, mode: str, reason: str, now_ns: int) -> None:
        if self.incident is not None:  # already capturing: extend the window
            self.incident_until_ns = now_ns + self.post_ns
            return
        path = self.out_dir / "incidents" / f"{self._stamp()}-{mode}.mcap"
        try:
            incident = self._sink(path, {"kind": "incident", "mode": mode, "reason": reason,
                                         "at": _iso_now()})
        except OSError as exc:
            self.stats.write_errors += 1
            log.error("incident=%s not written: %s", path, exc.strerror)
            return
        self.incident = incident
        for rec in self.ring:
            incident.write(rec)
        self._safe(incident, lambda: incident.maybe_flush(time.monotonic_ns()))
        self.incident_until_ns = now_ns + self.post_ns
        self.stats.incidents += 1
        log.warning("mode=%s reason=%r incident=%s ring_messages=%d", mode, reason, path,
                    len(self.ring))

    def _close_incident(self) -> None:
        if self.incident is not None:
            incident, self.incident = self.incident, None
            self._safe(incident, incident.close)
            self.enforce_budget()

    def _rotate_segment(self) -> None:
        if self.segment is not None:
            segment, self.segment = self.segment, None
            self._safe(segment, segment.close)
            self.enforce_budget()
        try:
            self.segment = self._sink(self.out_dir / "continuous" / f"{self._stamp()}.mcap",
                                      {"kind": "continuous"})
        except OSError as exc:
            self.stats.write_errors += 1
            log.error("continuous segment not started: %s", exc.strerror)

    def _files(self, sub: str) -> list[Path]:
        folder = self.out_dir / sub
        return sorted(folder.glob("*.mcap"), key=lambda p: p.stat().st_mtime) \
            if folder.is_dir() else []

    def _episodes_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files("episodes"))

    def free_bytes(self) -> int:
        probe = self.out_dir
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
        return shutil.disk_usage(probe).free

    def enforce_budget(self, min_free: int = 0) -> None:
        """Delete the oldest closed continuous segments, then the oldest closed incidents,
        until the recordings fit the budget and the file system keeps `reserve_mb` (and
        `min_free` bytes) free."""
        min_free = max(min_free, self.reserve_bytes)
        open_paths = {s.path for s in (self.episode, self.incident, self.segment) if s}
        candidates = [p for p in self._files("continuous") if p not in open_paths]
        total = sum(p.stat().st_size for sub in ("continuous", "incidents", "episodes")
                    for p in self._files(sub))
        free = self.free_bytes()
        for path in candidates:
            if total <= self.budget_bytes and free >= min_free:
                break
            size = path.stat().st_size
            path.unlink()
            total -= size
            free += size
            self.stats.deleted_files += 1
            log.info("budget deleted=%s bytes=%d free_mb=%d", path, size, free >> 20)
        disk_low = free < self.reserve_bytes
        if disk_low != self.disk_low:
            self.disk_low = disk_low
            log.warning("disk %s: free_mb=%d reserve_mb=%d%s", "full" if disk_low else "has room",
                        free >> 20, self.reserve_bytes >> 20,
                        "; continuous recording paused, incidents still written"
                        if disk_low else "")


    def _safe(self, sink: McapSink, op: Callable[[], Any]) -> bool:
        """Run a file operation; on a full disk make room and retry once; a write that still
        fails closes that file with the chunks it has (readable) and is counted."""
        for attempt in (1, 2):
            try:
                op()
                return True
            except OSError as exc:
                self.stats.write_errors += 1
                if exc.errno == errno.ENOSPC and attempt == 1:
                    self.enforce_budget(ENOSPC_HEADROOM)
                    continue
                log.error("file=%s write failed: %s; closing it", sink.path, exc)
                self.stats.cut_short.append(str(sink.path))
                self._abandon(sink)
                return False
        return False

    def _abandon(self, sink: McapSink) -> None:
        sink.abandon()
        for name in ("episode", "incident", "segment"):
            if getattr(self, name) is sink:
                setattr(self, name, None)

    # ------------------------------------------------------------------ data
    def handle(self, topic: str, msg: dict[str, Any]) -> None:
        now = time.monotonic_ns()
        if topic == "/sim/frame" and self.frame_period_ns is not None:
            if now - self.last_frame_ns < self.frame_period_ns:
                self.stats.frames_skipped += 1
                return
            self.last_frame_ns = now
        rec = to_record(topic, msg, self.wall)
        self.ring.append(rec)
        while self.ring and rec.log_time_ns - self.ring[0].log_time_ns > self.ring_ns:
            self.ring.popleft()
        for sink in (self.episode, self.incident, self.segment):
            if sink is None:
                continue
            if sink is self.segment and self.disk_low:
                self.stats.dropped["continuous: disk full"] += 1  # the reserve is the incidents'
                continue
            if not self._safe(sink, lambda s=sink: s.write(rec)):  # type: ignore[misc]
                self.stats.dropped["write failed"] += 1
        if topic == "/follower/telemetry":
            mode = msg.get("mode")
            if mode in LATCHED_MODES and mode != self.last_mode:
                self._open_incident(str(mode), str(msg.get("fault_reason") or ""), now)
            self.last_mode = mode if isinstance(mode, str) else None
        elif topic == "/planner/telemetry":
            # the task that ran is the planner's (an operator's task takes precedence over the
            # sim's announcements on /sim/task, which are recorded, not taken as the label)
            text = msg.get("instruction")
            if isinstance(text, str):
                self.instruction = text
                if self.episode is not None and text and text not in self.episode_instructions:
                    self.episode_instructions.append(text)
        elif topic == "/sim/episode" and self.episode is not None:
            self.episode_results.append(json.loads(rec.data))

    def status(self) -> dict[str, Any]:
        return {"dir": str(self.out_dir), "episode": str(self.episode.path) if self.episode
                else None, "incident": str(self.incident.path) if self.incident else None,
                "ring_messages": len(self.ring), "received": self.subs.received,
                "rejected": dict(self.subs.rejected), "incidents": self.stats.incidents,
                "deleted_files": self.stats.deleted_files,
                "write_errors": self.stats.write_errors, "last_mode": self.last_mode,
                "disk_full": self.disk_low, "dropped": dict(self.stats.dropped),
                "cut_short": list(self.stats.cut_short[-20:]),
                "free_mb": round(self.free_bytes() / 2**20, 1),
                "budget_mb": round(self.budget_bytes / 2**20, 1)}

    def poll_once(self, timeout_ms: int = 100) -> None:
        for sock, _ in self.poller.poll(timeout_ms):
            if sock is self.control:
                self.server.serve_pending()
                continue
            self.subs.drain(sock, self.handle)
        now = time.monotonic_ns()
        if self.incident is not None and now > self.incident_until_ns:
            self._close_incident()
        if self.continuous and (self.segment is None
                                or self.segment.size() > self.segment_bytes):
            self._rotate_segment()
        for sink in (self.episode, self.incident, self.segment):
            if sink is not None:
                self._safe(sink, lambda s=sink: s.maybe_flush(now))  # type: ignore[misc]
        if now - self.last_space_check_ns > 1e9:  # the disk is shared: watch its free space
            self.last_space_check_ns = now
            if self.free_bytes() < self.reserve_bytes or self.disk_low:
                self.enforce_budget()

    def run(self, ready: Callable[[], object] = lambda: None,
            duration_s: float | None = None) -> None:
        end = None if duration_s is None else time.monotonic() + duration_s
        ready()
        while not self.stop_requested and (end is None or time.monotonic() < end):
            self.poll_once()

    def close(self) -> None:
        for sink in (self.episode, self.incident, self.segment):
            if sink is not None:
                self._safe(sink, sink.close)
        self.episode = self.incident = self.segment = None
        self.subs.close()
        self.control.close(linger=0)


def recording_metadata(cfg: DuetConfig, config_label: str) -> dict[str, str]:
    """What every recording says about where it came from."""
    from runtime.version import version

    effective = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    try:
        manifest = json.loads((Path(cfg.bundle.path) / "manifest.json").read_text())
        bundle_version = str(manifest.get("version", "?"))
    except (OSError, ValueError, AttributeError):
        bundle_version = "unreadable"
    return {"robot": cfg.robot.name, "joints": ",".join(cfg.robot.joints), "units": UNITS,
            "config": config_label, "config_hash": hashlib.sha256(effective).hexdigest()[:16],
            "bundle": cfg.bundle.path, "bundle_version": bundle_version,
            "duet_version": version()}


def serve(cfg: DuetConfig, config_label: str, out_dir: Path, continuous: bool = False,
          frame_hz: float = 2.0, duration_s: float | None = None) -> int:
    """The recorder process (duet-recorder.service): until SIGTERM/SIGINT, then close files."""
    from runtime.ipc.notify import notifier as make_notifier

    rc = cfg.recorder
    rec = Recorder(cfg.run_dir, out_dir, rc.ring_s, rc.budget_mb,
                   recording_metadata(cfg, config_label), frame_hz=frame_hz,
                   continuous=continuous, joints=list(cfg.robot.joints))

    stop_on_signals(rec)
    notifier = make_notifier()
    log.info("run_dir=%s dir=%s ring_s=%g budget_mb=%g started", cfg.run_dir, out_dir,
             rc.ring_s, rc.budget_mb)
    try:
        rec.run(lambda: notifier.notify("READY=1"), duration_s)
    finally:
        notifier.notify("STOPPING=1")
        rec.close()
    return 0
