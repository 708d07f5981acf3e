"""The robot's plan source when its planner is off-board (`planner.remote`): it runs no
model, it relays.

Each planner cycle it sends the planner server (runtime/remote/server.py) what the bundle's
contract reads -- the states its proprio inputs sample, one JPEG per camera, the task, the
plan executing now when the model takes a prefix (runtime/remote/wire.py) -- and each plan
that comes back goes to the follower as it came, stamped by this process. An observation goes
every cycle, answered or not: the newest plan's age then swings between the round trip R and
R + one planner period, whatever R is (the server plans only a robot's newest observation).

The follower needs nothing new: plans keep `t_obs_ns` on this robot's clock, so a late plan
is refused as stale by the follower core and the arm holds. `ServerLink` checks that each
plan answers an observation this robot sent and is newer than the last one taken (a replay,
a forged or a crossed answer is dropped and counted). Its socket is a CURVE client (the
server's public key pinned, this robot's key pair) with ZMTP heartbeats, so a stalled
connection is dropped and redialled by libzmq: the robot reconnects by itself after a
partition or a server restart. Its messages are capped (ZMQ_MAXMSGSIZE): a server's oversize
frame cuts the connection before a byte of it is buffered, and since libzmq never redials
after such a protocol error, the link notices the missing retry and redials itself (counted
as `cut`).
"""

from __future__ import annotations

import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zmq
import zmq.utils.monitor

from runtime.config import DuetConfig, RemoteConfig
from runtime.ipc import endpoints, keys
from runtime.ipc.messages import Encoder, MessageError, decode, decode_plan, is_int, is_real
from runtime.ipc.sockets import open_socket
from runtime.ipc.stats import Ring, summarize
from runtime.model.bundle import Bundle
from runtime.model.contract import InstructionInput, PrefixInput
from runtime.model.plan import PlanBounds, PlanRejected
from runtime.model.tokenizer import TokenizerError
from runtime.planner.pipeline import instruction_encoder, state_times_ns
from runtime.planner.records import SourceFigures
from runtime.planner.shell import PlannerShell, PlanSource
from runtime.planner.tasks import TaskError
from runtime.remote import jpeg
from runtime.remote.wire import Sent, bundle_id, encode_observation

log = logging.getLogger("duet.planner.relay")

SENT_KEPT = 32  # observations remembered to match plans against
# libzmq announces its redial right after a lost connection; none within this long means the
# session was ended for a protocol error (an oversize or malformed frame) and is not redialled
CUT_AFTER_S = 0.5


def relay_socket(ctx: zmq.Context[zmq.Socket[bytes]], remote: RemoteConfig) -> zmq.Socket[bytes]:
    """A DEALER to the planner server; KeyFileError names a bad key file."""
    sock = open_socket(ctx, zmq.DEALER, endpoints.MAX_PLAN_BYTES)  # plans and refusals
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IMMEDIATE, 1)  # nothing queues for a server that is not connected
    sock.setsockopt(zmq.SNDHWM, 2)
    sock.setsockopt(zmq.RCVHWM, 16)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    sock.setsockopt(zmq.CONNECT_TIMEOUT, 1000)  # a SYN into a partition is retried
    sock.setsockopt(zmq.HANDSHAKE_IVL, 2000)  # and so is a handshake on a stalled link
    # ZMTP heartbeats: no traffic for 1 s (a stalled link) drops the connection; redialled
    sock.setsockopt(zmq.HEARTBEAT_IVL, 250)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 1000)
    sock.setsockopt(zmq.HEARTBEAT_TTL, 2000)
    if not remote.insecure:
        assert remote.server_key is not None and remote.robot_key is not None
        pair = keys.load_pair(remote.robot_key)
        sock.curve_serverkey = keys.load_public(remote.server_key)
        sock.curve_publickey = pair.public
        sock.curve_secretkey = pair.secret
    return sock


@dataclass(frozen=True)
class Answer:
    """A plan from the server that answers an observation sent and is newer than the last."""

    sent: Sent
    waypoints: np.ndarray  # [H, n] view on the message
    packed: dict[str, Any]  # the same, as it travelled (re-sent without a copy)
    dt_s: float
    t_recv_ns: int


class ServerLink:
    """This robot's connection to the planner server: observations out, checked plans in."""

    def __init__(self, remote: RemoteConfig, bounds: PlanBounds,
                 ctx: zmq.Context[zmq.Socket[bytes]] | None = None) -> None:
        self.remote, self.bounds = remote, bounds
        self.sock = relay_socket(ctx or zmq.Context.instance(), remote)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED
            | zmq.EVENT_HANDSHAKE_FAILED_AUTH | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
            | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL)
        self.sock.connect(remote.endpoint)
        self.enc = Encoder()
        self.sent: OrderedDict[int, Sent] = OrderedDict()
        self.last_t_obs = 0
        self.round_trip = Ring(1 << 16)  # observation sent -> its plan received, ms
        self.server_ms = Ring(1 << 16)  # the server's share (its own clock)
        self.refused: Counter[str] = Counter()  # by the server, by its reason
        self.dropped: Counter[str] = Counter()  # answers this side refused, by reason
        self.news = ""  # the last refusal, for the planner's status (taken by the reader)
        self.connected = False
        self.connects = self.disconnects = 0
        self._last_log = 0.0
        self._cut_check_at: float | None = None  # a disconnect whose redial is not yet seen

    def close(self) -> None:
        self.sock.close(linger=0)
        self.monitor.close(linger=0)

    def _log(self, text: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last_log >= 1.0:
            self._last_log = now
            log.warning(text, *args)

    def send(self, body: bytes, t_obs_ns: int, episode: Any) -> bool:
        """Send an observation encoded with `self.enc`; False when not connected."""
        try:
            self.sock.send(body, zmq.NOBLOCK)
        except zmq.Again:
            self.dropped["unsent"] += 1
            return False
        sent = Sent(self.enc.seq, t_obs_ns, time.monotonic_ns(), episode)
        self.sent[sent.seq] = sent
        while len(self.sent) > SENT_KEPT:
            self.sent.popitem(last=False)
        return True

    def receive(self) -> list[Answer]:
        """Every answer waiting; refusals and bad answers are counted, never raised."""
        self._link_events()
        out = []
        for _ in range(64):
            try:
                frame = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
            t_recv = time.monotonic_ns()
            try:
                answer = self._check(frame, t_recv)
            except (MessageError, PlanRejected) as exc:
                self.dropped[exc.kind] += 1
                self._log("answer from the planner server dropped (%s): %s", exc.kind, exc)
                continue
            except Exception as exc:  # a decoder bug: one dropped message, never a crash
                self.dropped["internal"] += 1
                self._log("answer from the planner server dropped (internal): %r", exc)
                continue
            if answer is not None:
                out.append(answer)
        return out

    def _check(self, frame: bytes, t_recv: int) -> Answer | None:
        if decode(frame)["type"] == "reply":
            msg = decode(frame, "reply")
            kind = msg.get("kind")
            kind = kind if type(kind) is str and len(kind) <= 32 else "unknown"
            self.refused[kind] += 1
            self.news = f"remote: refused ({kind})"
            self._log("the planner server refused an observation (%s): %s", kind,
                      str(msg.get("error"))[:300])
            return None
        msg, w = decode_plan(frame)
        seq = msg.get("obs_seq")
        sent = self.sent.get(seq) if is_int(seq) else None
        if sent is None:
            raise MessageError("unknown", f"a plan for observation {seq!r}, not one sent")
        if msg["t_obs_ns"] != sent.t_obs_ns:
            raise MessageError("forged", f"plan for observation {seq} claims t_obs "
                                         f"{msg['t_obs_ns']}, sent {sent.t_obs_ns}")
        if sent.t_obs_ns <= self.last_t_obs:
            raise MessageError("replay", f"plan for observation {seq}: not newer than the "
                                         "last one taken")
        self.bounds.check(w, float(msg["dt_s"]))
        self.last_t_obs = sent.t_obs_ns
        self.round_trip.add((t_recv - sent.t_send_ns) / 1e6)
        if is_real(msg.get("server_ms")):
            self.server_ms.add(float(msg["server_ms"]))
        return Answer(sent, w, msg["waypoints"], float(msg["dt_s"]), t_recv)

    def _link_events(self) -> None:
        while True:
            try:
                event = zmq.utils.monitor.recv_monitor_message(self.monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            kind = event["event"]
            if kind == zmq.EVENT_CONNECT_RETRIED:
                self._cut_check_at = None  # libzmq is redialling by itself
            elif kind == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self._cut_check_at = None
                self.connected = True
                self.connects += 1
                log.info("connected to the planner server %s", self.remote.endpoint)
            elif kind == zmq.EVENT_DISCONNECTED:
                if self.connected:
                    log.warning("lost the planner server %s; redialling", self.remote.endpoint)
                self.connected = False
                self.disconnects += 1
                self._cut_check_at = time.monotonic() + CUT_AFTER_S
            else:  # a failed handshake: wrong server key, or this robot is not admitted
                self.connected = False
                self.dropped["handshake"] += 1
                self._log("handshake with the planner server %s failed: wrong "
                          "planner.remote.server_key, or this robot's key is not in the "
                          "server's allow-list", self.remote.endpoint)
        if self._cut_check_at is not None and time.monotonic() >= self._cut_check_at:
            self._cut_check_at = None
            self.dropped["cut"] += 1
            self._log("the planner server %s cut by a protocol error (a message over %d bytes, "
                      "or a malformed frame); redialling", self.remote.endpoint,
                      endpoints.MAX_PLAN_BYTES)
            self.sock.disconnect(self.remote.endpoint)
            self.sock.connect(self.remote.endpoint)

    def figures(self, last: int | None = None) -> dict[str, Any]:
        return {
            "endpoint": self.remote.endpoint, "secure": not self.remote.insecure,
            "connected": self.connected, "connects": self.connects,
            "disconnects": self.disconnects,
            "round_trip_ms": summarize(self.round_trip.values(last), ("p50", "p99"), digits=2),
            "server_ms": summarize(self.server_ms.values(last), ("p50", "p99"), digits=2),
            "refused": dict(self.refused), "dropped": dict(self.dropped),
        }


class RelaySource(PlanSource):
    """Plans from the planner server: this cycle's observation goes out, and each plan that
    comes back is published the moment it arrives (between cycles)."""

    def __init__(self, cfg: DuetConfig, bundle: Bundle) -> None:
        assert cfg.planner.remote is not None
        self.remote = cfg.planner.remote
        self.contract = bundle.contract
        self.bundle_id = bundle_id(bundle)
        self.encoders = [instruction_encoder(i, bundle) for s in self.contract.planner.stages
                         for i in s.inputs if isinstance(i, InstructionInput)]
        self.wants_prefix = cfg.planner.prefix and any(
            isinstance(i, PrefixInput) for s in self.contract.planner.stages for i in s.inputs)
        lim = cfg.robot.limits
        self.link = ServerLink(self.remote,
                               PlanBounds(lim.position_min, lim.position_max, lim.plan_margin))
        self.last_waypoints: np.ndarray | None = None
        log.info("planner relay to %s (%s)", self.remote.endpoint,
                 "PLAINTEXT" if self.remote.insecure else "CURVE")

    def camera_names(self) -> Sequence[str]:
        return self.contract.camera_names()

    def close(self) -> None:
        self.link.close()

    def check_instruction(self, text: str) -> None:
        try:
            for enc in self.encoders:
                enc.check(text)
        except TokenizerError as exc:
            raise TaskError(str(exc)) from None

    def cycle(self, shell: PlannerShell) -> None:
        """Send this cycle's observation; its plan is published when it arrives."""
        self.between(shell)
        got = shell.observe()
        if got is None:
            return
        frames, t_obs = got
        link = self.link
        jpegs = {}
        for name, image in frames.items():
            data = jpeg.encode(image, self.remote.jpeg_quality)
            if len(data) > self.remote.max_frame_bytes:
                shell.status = f"frame_too_large ({name}: {len(data)} bytes)"
                shell.drop("frame_too_large")
                return
            jpegs[name] = data
        states = shell.history.rows_at(state_times_ns(self.contract, t_obs))
        body = encode_observation(
            link.enc, bundle=self.bundle_id, t_obs_ns=t_obs, states=states, jpegs=jpegs,
            instruction=shell.instruction, episode=shell.episode,
            previous=shell.last_plan if self.wants_prefix else None,
            previous_waypoints=self.last_waypoints, expected_s=shell.expected_latency_s())
        if not link.send(body, t_obs, shell.episode):
            shell.status = "remote: not connected"
        elif shell.status != "planning":
            shell.status = "remote: waiting"

    def sockets(self) -> Sequence[zmq.Socket[bytes]]:
        return (self.link.sock, self.link.monitor)

    def between(self, shell: PlannerShell) -> None:
        """Publish the plans that arrived, as they came."""
        for a in self.link.receive():
            shell.publish(a.waypoints, a.dt_s, a.sent.t_obs_ns, a.sent.episode, a.packed)
            self.last_waypoints = a.waypoints.copy()
        if self.link.news:
            shell.status, self.link.news = self.link.news, ""

    def figures(self, last: int | None) -> SourceFigures:
        # the server's own time per plan is this robot's inference time
        return {"remote": self.link.figures(last),
                "inference_ms": summarize(self.link.server_ms.values(last), ("p50", "p99"),
                                          digits=2)}
