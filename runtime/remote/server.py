"""`duet planner --listen tcp://HOST:PORT`: this host plans for robots over the network.

One ROUTER socket, CURVE-encrypted. The ZAP handler (runtime/ipc/access.py) admits only robots
whose public key is in the allow-list, their name becomes each message's User-Id, and
refusals are logged and counted; a socket monitor counts failed handshakes (a plaintext
client, a robot with the wrong server key, a replayed session). Each robot has a session:
its newest observation waits for the engine (an older one still waiting is superseded: a plan
from it would only be staler), it is served at most `rate_hz` times a second, and each plan
goes back on the connection its observation came on. Sends never block: a robot that
vanished or stopped reading costs a counted drop, never a stall for the others.

What the server computes is the robot's own bundle: an observation from a robot whose bundle
differs is refused. Plans echo the robot's `t_obs_ns`, so the robot's follower judges their
age on its own clock. The engine side is a `Backend` (runtime/remote/batching.py).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.utils.monitor

from runtime.config import DuetConfig, ServeConfig
from runtime.ipc import endpoints, keys
from runtime.ipc.access import REMOTE, RemoteAccess, ZapHandler
from runtime.ipc.messages import Encoder, MessageError
from runtime.ipc.signals import stop_on_signals
from runtime.ipc.sockets import open_socket
from runtime.ipc.stats import Ring, summarize
from runtime.model.bundle import Bundle, BundleError
from runtime.model.contract import InstructionInput
from runtime.model.engines import EngineError
from runtime.model.robot_bundle import robot_bundle
from runtime.model.tokenizer import TokenizerError
from runtime.planner.pipeline import PipelineError, PlannerPipeline, instruction_encoder
from runtime.remote.batching import Backend, Job, LocalBackend, Result
from runtime.remote.wire import (
    Limits,
    Received,
    bundle_id,
    decode_observation,
    encode_plan,
    encode_refusal,
    max_observation_bytes,
)

log = logging.getLogger("duet.planner.server")

# A robot's token bucket holds half a second of its rate (at least 2): observations that
# queued up while the engine was busy arrive together and are not a flood.
RATE_BURST_S = 0.5
SESSION_IDLE_S = 60.0  # a robot silent this long is forgotten (its counters stay summed)
HANDSHAKE_EVENTS: dict[int, str] = {
    int(zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL): "no_detail",
    int(zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL): "protocol",
    int(zmq.EVENT_HANDSHAKE_FAILED_AUTH): "auth",
}


class ServerError(Exception):
    """The server cannot start; the message names the key, file or input."""


@dataclass
class Session:
    name: str
    route: bytes = b""
    pending: Job | None = None
    tokens: float = 2.0
    t_tokens: float = 0.0
    last_seen: float = 0.0
    last_refusal_reply: float = 0.0
    observations: int = 0
    plans: int = 0
    refused: Counter[str] = field(default_factory=Counter)


def server_socket(ctx: zmq.Context[zmq.Socket[bytes]], serve: ServeConfig, n_cameras: int,
                  pair: keys.KeyPair | None) -> zmq.Socket[bytes]:
    sock = open_socket(ctx, zmq.ROUTER, max_observation_bytes(n_cameras, serve.max_frame_bytes))
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished robot raises: counted
    sock.setsockopt(zmq.RCVHWM, 16)
    sock.setsockopt(zmq.SNDHWM, 4)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 500)  # a dead robot's connection is closed in ~2 s
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 2000)
    sock.setsockopt(zmq.HANDSHAKE_IVL, 5000)  # a peer that never finishes its handshake
    if pair is not None:
        sock.curve_server = True
        sock.curve_secretkey = pair.secret
        sock.curve_publickey = pair.public
    ZapHandler.protect(sock, REMOTE)
    return sock


class PlannerServer:
    def __init__(self, cfg: DuetConfig, backend: Backend | None = None) -> None:
        if cfg.planner.serve is None or cfg.planner.serve.listen is None:
            raise ServerError("planner.serve.listen: give --listen tcp://HOST:PORT")
        self.cfg, self.serve = cfg, cfg.planner.serve
        serve = self.serve
        bundle = robot_bundle(cfg)
        self.bundle_id = bundle_id(bundle)
        self.dt_s = bundle.contract.planner.actions.dt_s
        self.instructions = [instruction_encoder(i, bundle) for s in
                             bundle.contract.planner.stages for i in s.inputs
                             if isinstance(i, InstructionInput)]
        cameras = frozenset(bundle.contract.camera_names())
        self.limits = Limits(len(cfg.robot.joints), cameras, serve.max_frame_bytes,
                             serve.max_frame_pixels)
        if backend is None:
            backend = make_backend(cfg, bundle)
        self.backend = backend
        pair, access = None, RemoteAccess({}, insecure=True)
        if not serve.insecure:
            assert serve.key is not None and serve.allow is not None
            try:
                pair = keys.load_pair(serve.key)
                access = RemoteAccess(keys.load_allow_list(serve.allow))
            except keys.KeyFileError as exc:
                raise ServerError(f"planner.serve: {exc}") from None
            if not access.allowed:
                log.warning("%s: no robot keys (*.key): every robot will be refused",
                            serve.allow)
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.zap = ZapHandler(self.ctx, None, remote=access)
        self.sock = server_socket(self.ctx, serve, len(cameras), pair)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_SUCCEEDED
            | zmq.EVENT_DISCONNECTED)
        try:
            self.sock.bind(str(serve.listen))
        except zmq.ZMQError as exc:
            self.close()
            raise ServerError(f"planner.serve.listen {serve.listen}: {exc}") from None
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        self.tel_pub = open_socket(self.ctx, zmq.PUB, endpoints.MAX_SUBSCRIPTION_BYTES)
        self.tel_pub.setsockopt(zmq.LINGER, 0)
        self.tel_pub.bind(endpoints.telemetry(cfg.run_dir, "planner-server"))
        self.enc, self.enc_tel = Encoder(), Encoder()
        self.sessions: dict[str, Session] = {}
        self.dropped: Counter[str] = Counter()  # by reason, over all robots
        self.handshakes: Counter[str] = Counter()
        self.disconnects = 0
        self.served_ms = Ring(1 << 16)  # observation received -> plan sent, server clock
        self.stop_requested = False
        self._last_log = 0.0
        log.info("planner server on %s (%s, bundle %s, batch %d)", self.endpoint,
                 "PLAINTEXT" if serve.insecure else "CURVE", bundle.version, backend.batch)

    def close(self) -> None:
        for sock in (self.sock, self.monitor, getattr(self, "tel_pub", None)):
            if sock is not None:
                sock.close(linger=0)
        self.zap.close()
        self.backend.close()
        self.ctx.term()

    # ------------------------------------------------------------------ receiving
    def _receive(self) -> None:
        for _ in range(256):
            try:
                frames = self.sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.dropped["envelope"] += 1
                continue
            route, body = frames[0].bytes, frames[1]
            name = str(body.get("User-Id"))
            key = name if not self.serve.insecure else f"{name}/{route.hex()}"
            session = self.sessions.get(key)
            if session is None:
                if len(self.sessions) >= self.serve.max_robots:
                    self._expire(time.monotonic())
                if len(self.sessions) >= self.serve.max_robots:
                    self.dropped["max_robots"] += 1
                    continue
                session = self.sessions[key] = Session(name, t_tokens=time.monotonic())
                log.info("robot %s connected", name)
            session.route = route
            try:
                self._take(session, body.bytes)
            except MessageError as exc:
                self._refuse(session, exc.kind, str(exc), None)
            except Exception as exc:  # a decoder bug: one refused message, never a crash
                self._refuse(session, "internal", f"{exc.__class__.__name__}", None)

    def _take(self, s: Session, body: bytes) -> None:
        now = time.monotonic()
        s.last_seen = now
        rate = self.serve.rate_hz
        s.tokens = min(max(2.0, rate * RATE_BURST_S), s.tokens + (now - s.t_tokens) * rate)
        s.t_tokens = now
        if s.tokens < 1.0:
            raise MessageError("rate", f"more than {self.serve.rate_hz:g} observations/s")
        s.tokens -= 1.0
        got: Received = decode_observation(body, self.limits)
        if got.bundle != self.bundle_id:
            raise MessageError("bundle", f"robot runs bundle {got.bundle}, this server "
                                         f"serves {self.bundle_id}")
        text = got.request.obs.instruction or ""
        try:
            for enc in self.instructions:
                enc.check(text)
        except TokenizerError as exc:
            raise MessageError("instruction", f"instruction: {exc}") from None
        s.observations += 1
        if s.pending is not None:
            self.dropped["superseded"] += 1  # its plan would be older than this one's
        s.pending = Job(s.name, s.route, got.seq, got.episode, got.request)

    def _refuse(self, s: Session, kind: str, text: str, seq: int | None) -> None:
        s.refused[kind] += 1
        self.dropped[kind] += 1
        self._log("robot %s: refused (%s): %s", s.name, kind, text)
        now = time.monotonic()
        if now - s.last_refusal_reply >= 1.0:  # a flooding robot gets one answer a second
            s.last_refusal_reply = now
            self._send(s.route, encode_refusal(self.enc, seq, kind, text))

    def _log(self, text: str, *args: Any) -> None:
        """A warning, once a second at most: a misbehaving peer cannot flood the log."""
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning(text, *args)

    def _send(self, route: bytes, body: bytes) -> bool:
        try:
            self.sock.send_multipart([route, body], zmq.NOBLOCK)
        except zmq.Again:
            self.dropped["backlog"] += 1  # the robot stopped reading
            return False
        except zmq.ZMQError:
            self.dropped["unroutable"] += 1  # the robot went away
            return False
        return True

    def _monitor(self) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = int(event["event"])
            failed = HANDSHAKE_EVENTS.get(kind)
            if failed is not None:
                self.handshakes[failed] += 1
                self._log("handshake failed (%s) from a peer at %s (%d so far)", failed,
                          event.get("endpoint", b"?"), sum(self.handshakes.values())
                          - self.handshakes["succeeded"])
            elif kind == zmq.EVENT_DISCONNECTED:
                self.disconnects += 1
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.handshakes["succeeded"] += 1

    def _expire(self, now: float) -> None:
        for key in [k for k, s in self.sessions.items() if now - s.last_seen > SESSION_IDLE_S]:
            log.info("robot %s: silent for %.0f s, forgotten", self.sessions[key].name,
                     SESSION_IDLE_S)
            del self.sessions[key]

    # ------------------------------------------------------------------ planning
    def _dispatch(self) -> None:
        free = self.backend.capacity()
        if free <= 0:
            return
        ready = sorted((s.pending for s in self.sessions.values() if s.pending is not None),
                       key=lambda j: j.t_recv_ns)[:free]
        if not ready:
            return
        for job in ready:
            self.sessions[self._key(job)].pending = None
        self.backend.submit(ready)

    def _key(self, job: Job) -> str:
        return job.robot if not self.serve.insecure else f"{job.robot}/{job.route.hex()}"

    def _answer(self, job: Job, result: Result) -> None:
        session = self.sessions.get(self._key(job))
        if isinstance(result, str) or not np.isfinite(result).all():
            why = result if isinstance(result, str) else "non-finite waypoints"
            if session is not None:
                self._refuse(session, "plan", why, job.seq)
            return
        t_send = time.monotonic_ns()
        ms = (t_send - job.t_recv_ns) / 1e6
        body = encode_plan(self.enc, result, self.dt_s, job.request.obs.t_obs_ns, job.episode,
                           job.seq, ms)
        if self._send(job.route, body):
            self.served_ms.add(ms)
            if session is not None:
                session.plans += 1

    def step(self, timeout_ms: int) -> None:
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            self._receive()
        self._monitor()
        self._dispatch()
        for job, result in self.backend.poll():
            self._answer(job, result)

    # ------------------------------------------------------------------ figures
    def telemetry(self) -> dict[str, Any]:
        now = time.monotonic()
        return {
            "source": "planner-server", "endpoint": self.endpoint,
            "secure": not self.serve.insecure, "batch": self.backend.batch,
            "robots": {s.name: {"observations": s.observations, "plans": s.plans,
                                "refused": dict(s.refused),
                                "last_seen_s": round(now - s.last_seen, 2)}
                       for s in self.sessions.values()},
            "refused_connections": dict(self.zap.refused),
            "handshakes": dict(self.handshakes), "disconnects": self.disconnects,
            "dropped": dict(self.dropped),
            "served_ms": summarize(self.served_ms.values(), ("p50", "p99"), digits=2),
            "batch_size": summarize(self.backend.sizes.values(), ("p50", "max"), digits=1),
        }

    def run(self, duration_s: float | None = None) -> None:
        from runtime.ipc.notify import notifier as make_notifier

        make_notifier().notify("READY=1")
        start = last_tel = time.monotonic()
        while not self.stop_requested:
            now = time.monotonic()
            if duration_s is not None and now - start >= duration_s:
                break
            waiting = any(s.pending is not None for s in self.sessions.values())
            self.step(0 if waiting else 1 if self.backend.in_flight() else 50)
            if now - last_tel >= 0.5:
                last_tel = now
                self._expire(now)
                self.tel_pub.send(self.enc_tel.encode("telemetry", self.telemetry()))


def make_backend(cfg: DuetConfig, bundle: Bundle) -> Backend:
    serve = cfg.planner.serve
    assert serve is not None
    if serve.engine == "ray":
        from runtime.remote.ray_backend import RayBackend

        return RayBackend(cfg, bundle.contract.planner.batch)
    pipeline = PlannerPipeline.configured(bundle, cfg)
    return LocalBackend(pipeline)


def run_server(cfg: DuetConfig, duration_s: float | None = None) -> int:
    try:
        server = PlannerServer(cfg)
    except (ServerError, BundleError, EngineError, PipelineError, TokenizerError) as exc:
        log.error("%s", exc)
        return 2

    stop_on_signals(server)
    try:
        server.run(duration_s)
    finally:
        Path(cfg.run_dir, endpoints.PLANNER_SERVER_SUMMARY).write_text(
            json.dumps(server.telemetry()))
        server.close()
    return 0
