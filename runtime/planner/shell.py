"""The planner process's shell (System 2 on the robot): inputs, tasks, outputs and the loop,
a few times a second, around a plan source (`PlanSource`, below).

It never plans on stale inputs: without a fresh frame from every camera the source reads or a
recent joint state, `observe` gives nothing and the follower's plan timeout brings the arm to
a hold. Without a task it is `idle` (healthy: the robot holds). Tasks arrive on the `task`
socket (`duet task`, a fleet system) or, with `planner.task_source: sim`, from the sim's
episode announcements; the current task is kept in the run dir, so a restarted planner
carries on with it. Joint states are kept as they arrive (a model may read a history), and
the plan last published is the action prefix of the next for models that take one.

The shell is composed with one plan source: the bundle's pipeline on this host
(runtime/planner/local.py), an off-board planner server (runtime/remote/relay.py), or the
sim's scripted expert (sim/operator.py). The shell owns every input and output; a source only
decides what to plan, through the shell's `observe` and `publish`. A source is built before
the shell and knows nothing of its sockets, so each can be built and tested alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import zmq

from drivers.camera import Camera
from runtime.config import DuetConfig
from runtime.ipc import endpoints
from runtime.ipc.access import OPERATOR, GuardedSubscriber, Policy, ZapHandler, uid_of
from runtime.ipc.iothreads import realtime_io_threads
from runtime.ipc.logs import ChangeLog
from runtime.ipc.messages import (
    Encoder,
    MessageError,
    decode,
    decode_state,
    finite_array,
    pack_array,
)
from runtime.ipc.notify import notifier as make_notifier
from runtime.ipc.rpc import Command, RequestError, bind_server
from runtime.ipc.sockets import open_socket
from runtime.ipc.stats import Ring, summarize
from runtime.model.plan import Plan
from runtime.model.timing import Latency, timing_checks
from runtime.planner.cameras import open_camera
from runtime.planner.observation import StateHistory
from runtime.planner.records import PlannerSummary, PlannerTelemetry, SourceFigures
from runtime.planner.tasks import TaskError, TaskStore

log = logging.getLogger("duet.planner")

STATE_MAX_AGE_NS = 200_000_000  # a joint state older than this is not planned on
TIMING_CHECK_PLANS = 5  # the measured latency is checked against the timing after this many


class PlanSource(Protocol):
    """What the shell needs of a source. A source may subclass this for the optional hooks'
    defaults (no sockets, nothing between cycles, no figures, nothing to close)."""

    # False: the source plans without a task (identification); the shell does not idle it
    needs_instruction: bool = True

    def camera_names(self) -> Sequence[str]:
        """The cameras whose fresh frames a cycle needs (none: the shell opens none)."""
        ...

    def check_instruction(self, text: str) -> None:
        """Refuse what the model cannot read (raise TaskError naming why)."""
        ...

    def cycle(self, shell: PlannerShell) -> None:
        """One planner cycle: `shell.observe()`, then `shell.publish(...)` or a status."""
        ...

    def sockets(self) -> Sequence[zmq.Socket[bytes]]:
        """Sockets the shell also waits on between cycles."""
        return ()

    def between(self, shell: PlannerShell) -> None:
        """After each wait between cycles (a relay publishes the plans that arrived)."""
        return None

    def figures(self, last: int | None) -> SourceFigures:
        """The source's own telemetry (`last` samples) or summary (None) entries."""
        return {}

    def interrupt(self) -> None:
        """Stop a plan in progress: called from a signal's watcher thread at stop."""
        return None

    def close(self) -> None:
        """Release what the source holds."""
        return None


class PlannerShell:
    """The planner process's I/O and loop around a `PlanSource` that decides the plans."""

    def __init__(self, cfg: DuetConfig, bundle_version: str, source: PlanSource,
                 cameras: dict[str, Camera] | None = None, started_ns: int | None = None
                 ) -> None:
        """`started_ns`: when the process started (monotonic), before the bundle was verified
        and its engines loaded: `load_s` and `first_plan_s` count from it."""
        self.started_ns = started_ns if started_ns is not None else time.monotonic_ns()
        self.cfg = cfg
        self.source = source
        self.n = len(cfg.robot.joints)
        self.bundle_version = bundle_version
        self.cameras = cameras if cameras is not None else {
            name: open_camera(name, cfg.planner.cameras[name], cfg.run_dir)
            for name in source.camera_names()}
        self.history = StateHistory(self.n)
        self.tasks = TaskStore(Path(cfg.run_dir) / endpoints.TASK_FILE, source.check_instruction)
        if self.tasks.current is None and cfg.planner.instruction:
            self.tasks.set(cfg.planner.instruction, None, "config")
        self.last_plan: Plan | None = None
        self.last_waypoints: np.ndarray | None = None  # of last_plan, as published
        # what the plan in progress was computed from (frames, t_obs): the shadow feed's
        self.observed: tuple[dict[str, np.ndarray], int] | None = None

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        # the plan leaves through this context's I/O thread: as prompt as the follower's
        io = realtime_io_threads(ctx, cfg.follower.realtime.sched_fifo_priority - 1)
        if io:
            log.info("realtime: %s", io)
        self.zap = ZapHandler(ctx, Policy(planner_uid=uid_of(cfg.access.planner_user),
                                          operator_group=cfg.access.operator_group,
                                          follower_uid=uid_of(cfg.access.follower_user)))
        # every state is kept (a model may read a history): not conflated; only the follower's
        # user publishes it, and a refused forger does not leave the planner deaf
        self.state = GuardedSubscriber(ctx, self.zap, "state", endpoints.state(cfg.run_dir),
                                       endpoints.MAX_STATE_BYTES, 4096)
        self.task_sub: zmq.Socket[bytes] | None = None
        if cfg.planner.task_source == "sim":
            # Task announcements share the sim's PUB socket with frames; this SUB is not
            # conflated so no announcement is lost behind a frame.
            self.task_sub = open_socket(ctx, zmq.SUB, endpoints.MAX_SIM_BYTES)
            self.task_sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.task_sub.connect(endpoints.sim(cfg.run_dir))
        # The follower owns (binds) the plan endpoint and admits only the planner's user.
        self.plan_pub = open_socket(ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.plan_pub.setsockopt(zmq.SNDHWM, 4)
        self.plan_pub.connect(endpoints.plan(cfg.run_dir))
        self.tel_pub = open_socket(ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.tel_pub.bind(endpoints.telemetry(cfg.run_dir, "planner"))
        self.task_server = bind_server(ctx, endpoints.task(cfg.run_dir), {
            "task": Command(self._cmd_task, OPERATOR, "set or clear the instruction"),
            "status": Command(lambda _: dict(self.telemetry()), OPERATOR, "planner status"),
        }, zap_domain="control")
        self.enc_plan, self.enc_tel = Encoder(), Encoder()
        self.poller = zmq.Poller()
        for sock in (self.task_server.sock, *source.sockets()):
            self.poller.register(sock, zmq.POLLIN)

        self.plans = 0
        self.status = "starting"
        self.camera_age_ms: dict[str, float | None] = {}
        self.latency = Ring(1 << 16)  # observation -> plan published, ms
        self.cycle_starts = Ring(1 << 16)
        self.dropped: dict[str, int] = {}
        self.stop_requested = False
        self.first_plan_ns: int | None = None
        self.load_s = (time.monotonic_ns() - self.started_ns) / 1e9  # verified, loaded, bound
        self._said_slow = False  # "slower than planner.hz" is said once per run
        self._refused_texts: set[str] = set()  # tasks refused and logged (once each)
        self.plan_started_ns = 0  # of the plan in progress (0: none)

    def close(self) -> None:
        self.source.close()
        self.state.close()
        socks = [self.plan_pub, self.tel_pub, self.task_server.sock]
        for sock in socks + ([self.task_sub] if self.task_sub is not None else []):
            sock.close(linger=0)
        self.zap.close()
        for camera in self.cameras.values():
            camera.close()

    def interrupt(self) -> None:
        """Stop now (SIGTERM, SIGINT): the loop ends and a plan in progress is interrupted,
        not waited for (a 3 B planner's plan takes seconds; systemd would kill it)."""
        self.stop_requested = True
        log.info("stop asked: interrupting the plan in progress, if any")
        self.source.interrupt()

    def drop(self, kind: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1

    # ------------------------------------------------------------------ inputs
    def _drain_inputs(self) -> None:
        self.state.check()  # the refusal itself is logged by the ZAP handler
        for _ in range(4096):
            try:
                frame = self.state.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                self._take_state(frame)
            except MessageError as exc:
                self.drop(exc.kind)
        while self.task_sub is not None:
            try:
                frame = self.task_sub.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                msg = decode(frame)
                if msg["type"] == "task":
                    self._sim_task(msg.get("instruction"), msg.get("episode"))
            except (MessageError, RequestError) as exc:
                self.drop(getattr(exc, "kind", "task"))
        self.task_server.serve_pending()

    def _take_state(self, frame: bytes) -> None:
        msg, q, dq = decode_state(frame, self.n)
        extra = {}
        for name in ("effort", "q_cmd"):
            if name in msg:
                value = finite_array(msg[name], name)
                if value.shape != (self.n,):
                    raise MessageError("shape", f"{name} shape {list(value.shape)}")
                extra[name] = value
        self.history.add(msg["t_read_ns"], q=q, dq=dq, **extra)

    def _sim_task(self, text: Any, episode: Any) -> None:
        if not isinstance(text, str) or not (episode is None or type(episode) is int):
            raise RequestError("malformed task announcement")
        current = self.tasks.current
        if current is not None and current.source == "operator":
            return  # an operator's task runs until `duet task --clear`; then the sim's again
        if current is None or current.instruction != text or current.episode != episode:
            try:
                self.tasks.set(text, episode, "sim")
            except TaskError as exc:
                self._refused(text, "sim", exc)
                raise RequestError(str(exc)) from None

    def _refused(self, text: str, source: str, exc: TaskError) -> None:
        """A task the model cannot read, logged with its words and why, once per text (the
        sim announces its task again and again; the robot meanwhile does not move)."""
        if text in self._refused_texts or len(self._refused_texts) >= 256:
            return
        self._refused_texts.add(text)
        log.warning("%s task refused: %r: %s", source, text[:200], exc)

    def _cmd_task(self, args: dict[str, Any]) -> dict[str, Any]:
        # With planner.task_source sim, an operator's task takes precedence over the sim's
        # episode feed until it is cleared; the sim's next announcement then takes over.
        if args.get("clear") is True:
            self.tasks.clear("operator")
            log.info("task cleared")
            return {"task": None, "next": self.cfg.planner.task_source}
        text, episode = args.get("instruction"), args.get("episode")
        if not isinstance(text, str):
            raise RequestError("task: `instruction` (text) or `clear: true` is required")
        if episode is not None and not (type(episode) is int or isinstance(episode, str)):
            raise RequestError("task: `episode` must be an integer or a string")
        try:
            task = self.tasks.set(text, episode, "operator")
        except TaskError as exc:
            self._refused(text, "operator", exc)
            raise RequestError(f"task refused: {exc}") from None
        log.info("task set: %r (episode %s)", task.instruction, task.episode)
        return {"task": task.as_dict()}

    @property
    def instruction(self) -> str:
        task = self.tasks.current
        return task.instruction if task is not None else ""

    @property
    def episode(self) -> Any:
        task = self.tasks.current
        return task.episode if task is not None else None

    # ------------------------------------------------------------------ one cycle
    def _frames(self, now: int) -> dict[str, np.ndarray] | None:
        frames: dict[str, np.ndarray] = {}
        for name, camera in self.cameras.items():
            frame = camera.read_latest()
            if frame is None:
                self.status, self.camera_age_ms[name] = f"no_frames ({name})", None
                return None
            age = self.camera_age_ms[name] = (now - frame.capture_t_ns) / 1e6
            if age > self.cfg.planner.cameras[name].stale_ms:
                self.status = f"camera_stale ({name})"
                return None
            frames[name] = frame.image
        return frames

    def observe(self) -> tuple[dict[str, np.ndarray], int] | None:
        """Fresh frames and the newest state's read time (t_obs), or None with the status
        saying why there is nothing to plan on (and the prefix forgotten when idle)."""
        self._drain_inputs()
        now = time.monotonic_ns()
        frames = self._frames(now)
        if frames is None:
            return None
        t_obs = self.history.latest_t_ns
        if not t_obs or now - t_obs > STATE_MAX_AGE_NS:
            self.status = "no_state"
            return None
        if not self.instruction and self.source.needs_instruction:
            self.status = "idle"  # no task: the robot holds; healthy
            self.last_plan = None
            return None
        # a plan begins: said now, so a plan of seconds shows as one in progress (`in_plan_s`)
        self.plan_started_ns = now
        self.tel_pub.send(self.enc_tel.encode("telemetry", self.telemetry()))
        self.observed = frames, t_obs
        return frames, t_obs

    def expected_latency_s(self) -> float:
        """How long after t_obs a plan takes effect, by the recent ones (the prefix)."""
        recent = self.latency.values(20)
        return float(np.median(recent)) / 1e3 if recent.size else 0.0

    def publish(self, waypoints: np.ndarray, dt_s: float, t_obs: int, episode: Any,
                waypoints_packed: dict[str, Any] | None = None) -> None:
        """Send a plan to the follower (and to observers); it becomes the next prefix."""
        t_done = time.monotonic_ns()
        latency_ms = (t_done - t_obs) / 1e6
        plan = self.enc_plan.encode("plan", {
            "waypoints": waypoints_packed or pack_array(waypoints), "dt_s": dt_s,
            "t_obs_ns": t_obs, "latency_ms": latency_ms, "episode": episode})
        self.plan_pub.send(plan)
        self.tel_pub.send(plan)  # observers (the recorder) see plans here
        self.last_waypoints = waypoints.copy()
        self.last_plan = Plan(self.last_waypoints, dt_s, t_obs / 1e9, t_done / 1e9)
        self.plans += 1
        if self.first_plan_ns is None:
            self.first_plan_ns = t_done
        self.latency.add(latency_ms)
        self.status = "planning"
        if self.plans == TIMING_CHECK_PLANS:
            self._check_timing(len(waypoints), dt_s)

    def _check_timing(self, horizon: int, dt_s: float) -> None:
        """Once: the measured latency against the robot's timing (runtime/model/timing.py),
        so a planner too slow for the plan timeout says why the robot only holds."""
        recent = self.latency.values(TIMING_CHECK_PLANS)
        lat = Latency(float(np.percentile(recent, 50)), float(recent.max()),
                      f"measured over the first {len(recent)} plans")
        for level, why in timing_checks(lat, horizon, dt_s, self.cfg):
            if level == "fail":
                log.error("%s", why)
            elif "planner.hz" not in why:  # the cycle time says that one (run)
                log.warning("%s", why)

    def wait(self, timeout_ms: int) -> None:
        """Between cycles: task requests and whatever the source waits for."""
        self.poller.poll(timeout_ms)
        self.task_server.serve_pending()
        self.source.between(self)

    def telemetry(self) -> PlannerTelemetry:
        starts = self.cycle_starts.values(20)
        hz = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
        return {
            "source": "planner", "status": self.status, "plans": self.plans,
            "achieved_hz": round(hz, 2), "bundle": self.bundle_version,
            "latency_ms": summarize(self.latency.values(50), ("p50", "p99"), digits=2),
            "camera_age_ms": {k: None if v is None else round(v, 1)
                              for k, v in self.camera_age_ms.items()},
            "instruction": self.instruction, "episode": self.episode,
            "dropped_messages": self.dropped_messages(), **self.source.figures(50),
            "in_plan_s": round((time.monotonic_ns() - self.plan_started_ns) / 1e9, 3)
            if self.plan_started_ns else None,
        }

    def dropped_messages(self) -> dict[str, int]:
        return {**self.dropped, **{f"access_{domain}": v
                                   for domain, v in self.zap.refused.items()}}

    def run(self, duration_s: float | None = None) -> None:
        period_ns = round(1e9 / self.cfg.planner.hz)
        start = time.monotonic_ns()
        deadline = start
        notifier = make_notifier()
        notifier.notify("READY=1")
        last_status = ""
        status_log = ChangeLog(log, "planner status")  # the log: settled changes only
        while not self.stop_requested:
            now = time.monotonic_ns()
            if duration_s is not None and now - start >= duration_s * 1e9:
                break
            if now < deadline:  # wait, answering task requests meanwhile
                self.wait(min(deadline - now, 50_000_000) // 1_000_000)
                continue
            deadline += period_ns
            if deadline < now:
                deadline = now + period_ns
            self.cycle_starts.add(now / 1e9)
            self.source.cycle(self)
            self.plan_started_ns = 0
            took_ns = time.monotonic_ns() - now
            if took_ns > period_ns and self.plans > 1 and not self._said_slow:
                self._said_slow = True
                log.warning("planner slower than planner.hz %g: a cycle took %.0f ms, the "
                            "period is %.0f ms: it plans back to back (said once)",
                            self.cfg.planner.hz, took_ns / 1e6, period_ns / 1e6)
            self.tel_pub.send(self.enc_tel.encode("telemetry", self.telemetry()))
            if self.status != last_status:  # systemctl status shows the newest at once
                notifier.notify(f"STATUS={self.status}")
                last_status = self.status
            status_log.update(self.status, time.monotonic())
        if self.status == "stopping":
            log.info("stopped: the plan in progress was interrupted, not waited for")

    def summary(self) -> PlannerSummary:
        starts = self.cycle_starts.values()
        span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
        return {
            "plans": self.plans,
            "achieved_hz": round(self.plans / span, 2) if span else 0.0,
            "latency_ms": summarize(self.latency.values(), ("p50", "p99"), digits=2),
            "load_s": round(self.load_s, 3),
            "first_plan_s": None if self.first_plan_ns is None
            else round((self.first_plan_ns - self.started_ns) / 1e9, 3),
            "dropped_messages": self.dropped_messages(), **self.source.figures(None),
        }
