"""The planner process (System 2): camera + instruction + joint state -> a plan, a few Hz.

It never plans on stale inputs: without a fresh frame or a recent joint state it publishes
nothing, and the follower's plan timeout brings the arm to a hold. Without a task it is
`idle` (healthy: the robot holds). Tasks arrive on the `task` socket (`duet task`, a fleet
system) or, with `planner.task_source: sim`, from the sim's episode announcements; the
current task is kept in the run dir, so a restarted planner carries on with it.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from drivers.bus import BusError
from drivers.camera import Camera, CameraError
from runtime import endpoints
from runtime.access import OPERATOR, Policy, ZapHandler, uid_of
from runtime.bundle import BundleError, load_bundle
from runtime.cameras import open_camera
from runtime.config import DuetConfig
from runtime.engines import EngineError, make_engine
from runtime.messages import Encoder, MessageError, decode, decode_state, pack_array
from runtime.notify import notifier as make_notifier
from runtime.rpc import Command, RequestError, bind_server
from runtime.stats import Ring, summarize
from runtime.tasks import TaskError, TaskStore
from runtime.tokenizer import Tokenizer, TokenizerError

log = logging.getLogger("duet.planner")

STATE_MAX_AGE_NS = 200_000_000  # a joint state older than this is not planned on


class Planner:
    def __init__(self, cfg: DuetConfig, camera: Camera | None = None) -> None:
        self.cfg = cfg
        self.n = len(cfg.robot.joints)
        bundle = load_bundle(cfg.bundle.path, cfg.bundle.public_key, cfg.robot.joints)
        manifest = bundle.manifest
        self.engine = make_engine(manifest.models.planner, bundle, cfg.bundle.engine)
        self.tokenizer = Tokenizer.load(bundle.tokenizer_path)
        self.dt_s = float(manifest.dt_s)
        self.camera = camera if camera is not None else open_camera(cfg.planner.camera, cfg.run_dir)
        self.tasks = TaskStore(Path(cfg.run_dir) / endpoints.TASK_FILE, self._check_instruction)
        if self.tasks.current is None and cfg.planner.instruction:
            self.tasks.set(cfg.planner.instruction, None, "config")
        self.tokens = np.zeros((1, self.tokenizer.max_len), dtype=np.int64)
        self._tokens_for: str | None = None
        self.q = np.zeros((1, self.n), dtype=np.float32)
        self.state_t_ns = 0

        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
        self.zap = ZapHandler(ctx, Policy(planner_uid=uid_of(cfg.access.planner_user),
                                          operator_group=cfg.access.operator_group))
        self.state_sub = ctx.socket(zmq.SUB)
        self.state_sub.setsockopt(zmq.CONFLATE, 1)
        self.state_sub.setsockopt(zmq.MAXMSGSIZE, endpoints.MAX_STATE_BYTES)
        self.state_sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.state_sub.connect(endpoints.state(cfg.run_dir))
        self.task_sub: zmq.Socket[bytes] | None = None
        if cfg.planner.task_source == "sim":
            # Task announcements share the sim's PUB socket with frames; this SUB is not
            # conflated so no announcement is lost behind a frame.
            self.task_sub = ctx.socket(zmq.SUB)
            self.task_sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.task_sub.setsockopt(zmq.MAXMSGSIZE, endpoints.MAX_FRAME_BYTES)
            self.task_sub.connect(endpoints.sim(cfg.run_dir))
        # The follower owns (binds) the plan endpoint and admits only the planner's user.
        self.plan_pub = ctx.socket(zmq.PUB)
        self.plan_pub.setsockopt(zmq.SNDHWM, 4)
        self.plan_pub.connect(endpoints.plan(cfg.run_dir))
        self.tel_pub = ctx.socket(zmq.PUB)
        self.tel_pub.bind(endpoints.telemetry(cfg.run_dir, "planner"))
        self.task_server = bind_server(ctx, endpoints.task(cfg.run_dir), {
            "task": Command(self._cmd_task, OPERATOR, "set or clear the instruction"),
            "status": Command(lambda _: self.telemetry(), OPERATOR, "planner status"),
        }, zap_domain="control")
        self.enc_plan, self.enc_tel = Encoder(), Encoder()

        self.plans = 0
        self.status = "starting"
        self.camera_age_ms: float | None = None
        self.latency = Ring(1 << 16)  # observation -> plan published, ms
        self.inference = Ring(1 << 16)  # engine time, ms
        self.cycle_starts = Ring(1 << 16)
        self.dropped: dict[str, int] = {}
        self.stop_requested = False

    def close(self) -> None:
        socks = [self.state_sub, self.plan_pub, self.tel_pub, self.task_server.sock]
        for sock in socks + ([self.task_sub] if self.task_sub is not None else []):
            sock.close(linger=0)
        self.zap.close()
        self.camera.close()

    def _drop(self, kind: str) -> None:
        self.dropped[kind] = self.dropped.get(kind, 0) + 1

    def _drain_inputs(self) -> None:
        try:
            frame = self.state_sub.recv(zmq.NOBLOCK)
            msg, q, _ = decode_state(frame, self.n)
            self.q[0] = q
            self.state_t_ns = msg["t_read_ns"]
        except zmq.Again:
            pass
        except MessageError as exc:
            self._drop(exc.kind)
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
                self._drop(getattr(exc, "kind", "task"))
        self.task_server.serve_pending()

    def _check_instruction(self, text: str) -> None:
        """Refuse what the model's tokenizer cannot represent (RequestError names why)."""
        try:
            self.tokenizer.check(text)
        except TokenizerError as exc:
            raise TaskError(str(exc)) from None

    def _sim_task(self, text: Any, episode: Any) -> None:
        if not isinstance(text, str) or not (episode is None or type(episode) is int):
            raise RequestError("malformed task announcement")
        current = self.tasks.current
        if current is None or current.instruction != text or current.episode != episode:
            try:
                self.tasks.set(text, episode, "sim")
            except TaskError as exc:
                raise RequestError(str(exc)) from None

    def _cmd_task(self, args: dict[str, Any]) -> dict[str, Any]:
        if self.cfg.planner.task_source != "operator":
            raise RequestError(f"this robot's tasks come from the {self.cfg.planner.task_source}"
                               " (planner.task_source)")
        if args.get("clear") is True:
            self.tasks.clear("operator")
            return {"task": None}
        text, episode = args.get("instruction"), args.get("episode")
        if not isinstance(text, str):
            raise RequestError("task: `instruction` (text) or `clear: true` is required")
        if episode is not None and not (type(episode) is int or isinstance(episode, str)):
            raise RequestError("task: `episode` must be an integer or a string")
        try:
            task = self.tasks.set(text, episode, "operator")
        except TaskError as exc:
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

    def step(self) -> bool:
        """One planning cycle; True when a plan was published."""
        self._drain_inputs()
        now = time.monotonic_ns()
        frame = self.camera.read_latest()
        if frame is None:
            self.status, self.camera_age_ms = "no_frames", None
            return False
        self.camera_age_ms = (now - frame.capture_t_ns) / 1e6
        if self.camera_age_ms > self.cfg.planner.camera.stale_ms:
            self.status = "camera_stale"
            return False
        if not self.state_t_ns or now - self.state_t_ns > STATE_MAX_AGE_NS:
            self.status = "no_state"
            return False
        if not self.instruction:
            self.status = "idle"  # no task: the robot holds; healthy
            return False
        if self._tokens_for != self.instruction:
            self.tokens[0] = self.tokenizer.encode(self.instruction)
            self._tokens_for = self.instruction
        t_obs = self.state_t_ns
        t0 = time.monotonic_ns()
        out = self.engine.run({"image": frame.image[None], "tokens": self.tokens, "q": self.q})
        t1 = time.monotonic_ns()
        waypoints = out["waypoints"][0]
        if not np.isfinite(waypoints).all():
            self.status = "nonfinite_output"
            return False
        latency_ms = (t1 - t_obs) / 1e6
        plan = self.enc_plan.encode("plan", {
            "waypoints": pack_array(waypoints.astype(np.float32, copy=False)),
            "dt_s": self.dt_s, "t_obs_ns": t_obs, "latency_ms": latency_ms,
            "episode": self.episode})
        self.plan_pub.send(plan)
        self.tel_pub.send(plan)  # observers (the recorder) see plans here
        self.plans += 1
        self.latency.add(latency_ms)
        self.inference.add((t1 - t0) / 1e6)
        self.status = "planning"
        return True

    def telemetry(self) -> dict[str, Any]:
        starts = self.cycle_starts.values(20)
        hz = (len(starts) - 1) / (starts[-1] - starts[0]) if len(starts) > 1 else 0.0
        return {
            "source": "planner", "status": self.status, "plans": self.plans,
            "achieved_hz": round(hz, 2),
            "latency_ms": summarize(self.latency.values(50), ("p50", "p99"), digits=2),
            "inference_ms": summarize(self.inference.values(50), ("p50", "p99"), digits=2),
            "camera_age_ms": None if self.camera_age_ms is None else round(self.camera_age_ms, 1),
            "instruction": self.instruction, "episode": self.episode,
            "dropped_messages": dict(self.dropped),
        }

    def run(self, duration_s: float | None = None) -> None:
        period_ns = round(1e9 / self.cfg.planner.hz)
        start = time.monotonic_ns()
        deadline = start
        notifier = make_notifier()
        notifier.notify("READY=1")
        last_status = ""
        while not self.stop_requested:
            now = time.monotonic_ns()
            if duration_s is not None and now - start >= duration_s * 1e9:
                break
            if now < deadline:  # wait, answering task requests meanwhile
                if self.task_server.sock.poll(min(deadline - now, 50_000_000) // 1_000_000):
                    self.task_server.serve_pending()
                continue
            deadline += period_ns
            if deadline < now:
                deadline = now + period_ns
            self.cycle_starts.add(now / 1e9)
            self.step()
            self.tel_pub.send(self.enc_tel.encode("telemetry", self.telemetry()))
            if self.status != last_status:
                notifier.notify(f"STATUS={self.status}")
                log.info("planner status: %s", self.status)
                last_status = self.status

    def summary(self) -> dict[str, Any]:
        starts = self.cycle_starts.values()
        span = starts[-1] - starts[0] if len(starts) > 1 else 0.0
        return {
            "plans": self.plans,
            "achieved_hz": round(self.plans / span, 2) if span else 0.0,
            "latency_ms": summarize(self.latency.values(), ("p50", "p99"), digits=2),
            "inference_ms": summarize(self.inference.values(), ("p50", "p99"), digits=2),
            "dropped_messages": dict(self.dropped),
        }


def run_planner(cfg: DuetConfig, duration_s: float | None = None) -> int:
    try:
        planner = Planner(cfg)
    except (BundleError, EngineError, BusError, CameraError, TokenizerError, KeyError) as exc:
        log.error("%s", exc)
        return 2

    def _stop(signum: int, _frame: Any) -> None:
        planner.stop_requested = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        planner.run(duration_s)
    finally:
        Path(cfg.run_dir, "planner-summary.json").write_text(json.dumps(planner.summary()))
        planner.close()
    return 0
