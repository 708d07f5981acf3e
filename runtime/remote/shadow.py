"""Shadow mode: a candidate bundle's planner beside the active one on the live robot, on the
same observations, never actuating (`duet bundle shadow VERSION`).

Two halves, joined by the `shadow` socket in the run dir:
- `ShadowFeed` wraps the active planner's plan source. After each cycle that published a plan,
  and only while a shadow subscribes (an XPUB tells), it sends the observation that plan was
  computed from -- the same frames, raw, not re-captured (a V4L2 camera has one reader); the
  newest joint states; the task; the prefix the plan was conditioned on -- together with the
  plan itself, in the off-board planner's observation message (runtime/remote/wire.py). The
  send never blocks (a slow shadow loses observations, the planner never waits) and nothing
  is encoded while no shadow listens.
- `ShadowPlanner` is its own process: a crash, a GC pause or a slow engine there never touches
  the active planner, and it runs at a lower priority (`bundle.shadow.nice`) so on a CPU it
  only takes what the active planner leaves. It has no socket to the follower at all: it
  cannot actuate. It plans each observation it receives (the newest; those that arrived while
  it was busy are counted as skipped), compares its chunk with the active plan per joint and
  per horizon step (runtime/remote/divergence.py), times itself, and keeps the report in the
  run dir (SHADOW_REPORT, read by `duet bundle activate --if-shadow-ok`, `duet status`,
  `duet top`) and on its telemetry socket (recorded as /shadow/telemetry).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
import zmq

from runtime.config import DuetConfig
from runtime.ipc import endpoints
from runtime.ipc.messages import Encoder, MessageError, finite_array, is_real, pack_array
from runtime.ipc.signals import stop_on_signals
from runtime.ipc.sockets import open_socket
from runtime.ipc.stats import Ring, summarize
from runtime.model.bundle import Bundle
from runtime.model.engines import EngineError, EngineInterrupted
from runtime.model.plan import PlanRejected, check_chunk
from runtime.planner.observation import ObservationError
from runtime.planner.pipeline import PlannerPipeline
from runtime.planner.records import SourceFigures
from runtime.planner.shell import PlannerShell, PlanSource
from runtime.remote.divergence import Divergence, abs_difference
from runtime.remote.wire import MAX_STATE_ROWS, Limits, decode_observation, encode_observation

log = logging.getLogger("duet.shadow")

REPORT_EVERY_S = 1.0  # the report file and telemetry, at most this often (and at exit)
MAX_FRAME_PIXELS = 4096 * 4096


class ShadowReport(TypedDict):
    """The shadow planner's report (run dir SHADOW_REPORT, and its telemetry)."""

    source: str  # "shadow"
    candidate: str  # the candidate bundle's version
    active: str  # the active planner's bundle version the plans were compared with
    pid: int
    updated_unix_s: float  # wall clock of the last update
    plans: int  # compared
    skipped: int  # observations that arrived while the shadow was busy (not planned)
    errors: dict[str, int]  # observations refused or not planned, by reason
    latency_ms: dict[str, float]  # the candidate's plan (its pipeline call), p50/p99
    active_latency_ms: dict[str, float]  # the active planner's observation -> plan, p50/p99
    horizon: int
    dt_s: float
    divergence_rad: dict[str, Any]  # mean/p95/max, per_joint {name: ...}, per_step [...]


class ShadowFeed(PlanSource):
    """The active planner's source, wrapped: its observations and plans go to a shadow."""

    def __init__(self, inner: PlanSource, cfg: DuetConfig, bundle: Bundle) -> None:
        self.inner = inner
        self.needs_instruction = inner.needs_instruction
        self.version = bundle.version
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.pub = open_socket(ctx, zmq.XPUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.pub.setsockopt(zmq.SNDHWM, 2)  # a slow shadow loses observations, never delays
        self.pub.setsockopt(zmq.LINGER, 0)
        self.pub.bind(endpoints.shadow(cfg.run_dir))
        self.listening = False
        self.enc = Encoder()

    def camera_names(self) -> Sequence[str]:
        return self.inner.camera_names()

    def check_instruction(self, text: str) -> None:
        self.inner.check_instruction(text)

    def _subscriptions(self) -> None:
        """XPUB hands up (un)subscriptions: 1 = the first shadow came, 0 = the last left."""
        while True:
            try:
                frame = self.pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            if frame[:1] in (b"\x00", b"\x01"):
                self.listening = frame[:1] == b"\x01"
                log.info("shadow planner %s", "subscribed" if self.listening else "gone")

    def cycle(self, shell: PlannerShell) -> None:
        previous, previous_w = shell.last_plan, shell.last_waypoints
        expected, plans = shell.expected_latency_s(), shell.plans
        self.inner.cycle(shell)
        self._subscriptions()
        if not self.listening or shell.plans == plans or shell.observed is None \
                or shell.last_plan is None or shell.last_waypoints is None:
            return
        frames, t_obs = shell.observed
        body = encode_observation(
            self.enc, bundle=self.version, t_obs_ns=t_obs,
            states=shell.history.recent(t_obs, MAX_STATE_ROWS),
            jpegs={name: pack_array(image) for name, image in frames.items()},
            instruction=shell.instruction, episode=shell.episode, previous=previous,
            previous_waypoints=previous_w, expected_s=expected,
            active={"waypoints": pack_array(shell.last_waypoints.astype(np.float32)),
                    "dt_s": shell.last_plan.dt,
                    "latency_ms": float(shell.latency.values(1)[0])})
        try:
            self.pub.send(body, zmq.NOBLOCK)
        except zmq.Again:
            shell.drop("shadow_busy")

    def sockets(self) -> Sequence[zmq.Socket[bytes]]:
        return (*self.inner.sockets(), self.pub)

    def between(self, shell: PlannerShell) -> None:
        self._subscriptions()
        self.inner.between(shell)

    def figures(self, last: int | None) -> SourceFigures:
        return self.inner.figures(last)

    def interrupt(self) -> None:
        self.inner.interrupt()

    def close(self) -> None:
        self.pub.close(linger=0)
        self.inner.close()


def _active(msg: dict[str, Any], n: int) -> tuple[np.ndarray, float, float]:
    """The active plan in a feed message: (waypoints [H, n], dt_s, latency_ms)."""
    active = msg.get("active")
    if not isinstance(active, dict):
        raise MessageError("schema", "active: the active plan is missing")
    w = finite_array(active.get("waypoints"), "active.waypoints")
    dt, latency = active.get("dt_s"), active.get("latency_ms")
    if not is_real(dt) or not is_real(latency) or latency < 0:
        raise MessageError("schema", "active: dt_s and latency_ms must be numbers")
    try:
        check_chunk(w, float(dt), n)
    except PlanRejected as exc:
        raise MessageError(exc.kind, f"active: {exc}") from None
    return w, float(dt), float(latency)


class ShadowPlanner:
    def __init__(self, cfg: DuetConfig, bundle: Bundle) -> None:
        self.cfg = cfg
        self.joints = list(cfg.robot.joints)
        self.version = bundle.version
        self.pipeline = PlannerPipeline.configured(bundle, cfg)
        self.limits = Limits(len(self.joints), frozenset(self.pipeline.camera_names()), 0,
                             MAX_FRAME_PIXELS, more_cameras=True, raw_frames=True)
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.sub = open_socket(ctx, zmq.SUB, endpoints.MAX_SHADOW_BYTES)
        self.sub.setsockopt(zmq.CONFLATE, 1)  # the newest observation; older ones are skipped
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(endpoints.shadow(cfg.run_dir))
        self.tel = open_socket(ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.tel.setsockopt(zmq.LINGER, 0)
        self.tel.bind(endpoints.telemetry(cfg.run_dir, "shadow"))
        self.enc = Encoder()
        self.report_path = Path(cfg.run_dir) / endpoints.SHADOW_REPORT
        self.divergence = Divergence(self.joints)
        self.active_latency = Ring(4096)
        self.active = ""
        self.last_seq: int | None = None
        self.skipped = 0
        self.errors: Counter[str] = Counter()
        self.stop_requested = False
        self.horizon, self.dt_s = 0, 0.0

    def interrupt(self) -> None:
        self.stop_requested = True
        self.pipeline.interrupt()

    def step(self, frame: bytes) -> None:
        """One observation from the feed: plan it, compare, count."""
        try:
            got = decode_observation(frame, self.limits)
            active, active_dt, active_ms = _active(got.message, len(self.joints))
        except MessageError as exc:
            self.errors[exc.kind] += 1
            return
        if self.last_seq is not None and got.seq > self.last_seq + 1:
            self.skipped += got.seq - self.last_seq - 1
        self.last_seq = got.seq
        if got.bundle != self.active:
            if self.active:
                log.warning("the active planner now runs %s (was %s): a new comparison",
                            got.bundle, self.active)
            self.active, self.divergence = got.bundle, Divergence(self.joints)
            self.active_latency = Ring(4096)
        try:
            result = self.pipeline.plan_batch([got.request])[0]
        except EngineInterrupted:
            return  # stopping
        except EngineError as exc:
            self.errors["engine"] += 1
            log.warning("candidate engine failed: %s", exc)
            return
        if isinstance(result, ObservationError):
            self.errors["observation"] += 1
            log.warning("candidate cannot plan this observation: %s", result)
            return
        if not np.isfinite(result).all():
            self.errors["nonfinite_output"] += 1
            return
        self.horizon, self.dt_s = result.shape[0], self.pipeline.dt_s
        self.divergence.add(abs_difference(result, self.dt_s, active, active_dt))
        self.active_latency.add(active_ms)

    def report(self) -> ShadowReport:
        return {
            "source": "shadow", "candidate": self.version, "active": self.active,
            "pid": os.getpid(), "updated_unix_s": round(time.time(), 3),
            "plans": self.divergence.plans, "skipped": self.skipped,
            "errors": dict(self.errors),
            "latency_ms": summarize(self.pipeline.plan_ms.values(), ("p50", "p99"), digits=2),
            "active_latency_ms": summarize(self.active_latency.values(), ("p50", "p99"),
                                           digits=2),
            "horizon": self.horizon, "dt_s": self.dt_s,
            "divergence_rad": self.divergence.summary()}

    def publish(self) -> ShadowReport:
        report = self.report()
        tmp = self.report_path.with_name(f".{self.report_path.name}.tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, self.report_path)  # a reader sees the old report or the new one
        self.tel.send(self.enc.encode("telemetry", {
            **report, "divergence_rad": {k: v for k, v in report["divergence_rad"].items()
                                         if k != "per_step"}}))
        return report

    def run(self, duration_s: float | None, plans: int | None) -> ShadowReport:
        end = None if duration_s is None else time.monotonic() + duration_s
        said = 0.0
        while not self.stop_requested and (end is None or time.monotonic() < end) \
                and (plans is None or self.divergence.plans < plans):
            if self.sub.poll(200):
                self.step(self.sub.recv())
            if time.monotonic() - said >= REPORT_EVERY_S:
                said = time.monotonic()
                self.publish()
        return self.publish()

    def close(self) -> None:
        self.sub.close(linger=0)
        self.tel.close(linger=0)


def run_shadow(cfg: DuetConfig, bundle: Bundle, duration_s: float | None = None,
               plans: int | None = None) -> ShadowReport:
    """Plan beside the active planner until stopped (SIGINT, SIGTERM), `duration_s` or
    `plans` compared; the last report."""
    os.nice(cfg.bundle.shadow.nice)  # below the active planner (itself below the follower)
    shadow = ShadowPlanner(cfg, bundle)
    stop_on_signals(shadow, shadow.interrupt)
    log.info("shadow planner %s: waiting for the active planner's observations on %s",
             bundle.version, endpoints.shadow(cfg.run_dir))
    try:
        return shadow.run(duration_s, plans)
    finally:
        shadow.close()
