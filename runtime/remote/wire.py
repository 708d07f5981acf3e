"""The off-board planner's wire (issue 14): a robot's relay sends the planner server an
`observation`; the server answers with a `plan` for it, or a `reply` that refuses it.

They are the usual msgpack messages (runtime/ipc/messages.py). An observation carries what the
bundle's contract reads and nothing more: the joint states at the times its proprio inputs
sample (state at the planner's rate, not the follower's), one JPEG per camera it reads, the
instruction, and the plan executing now when the model takes an action prefix. Times stay on
the robot's monotonic clock: the server never compares them with its own and echoes
`t_obs_ns`, so the follower's age checks stay exact without any clock sync.

Both ends decode as hostile input: sizes, shapes, counts and finiteness are checked here and
only MessageError leaves (its kind is the drop counter's key).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from runtime.ipc.messages import (
    Encoder,
    MessageError,
    decode,
    finite_array,
    is_int,
    is_real,
    pack_array,
    unpack_array,
)
from runtime.model.bundle import Bundle
from runtime.model.plan import Plan, PlanRejected, check_chunk
from runtime.planner.observation import FIELDS, StateHistory
from runtime.planner.pipeline import Observation, PlanRequest
from runtime.planner.tasks import MAX_INSTRUCTION_CHARS
from runtime.remote import jpeg

MAX_STATE_ROWS = 256  # a 64-state history with room
MAX_CAMERAS = 8
MAX_EXPECTED_S = 60.0
_STATE_BYTES = 1 << 18  # states, prefix, instruction and framing, besides the frames


def bundle_id(bundle: Bundle) -> str:
    """What robot and server must agree on: the manifest's version and the planner's files."""
    planner = sorted(s.file for s in bundle.contract.planner.stages)
    return bundle.version + ":" + ",".join(bundle.files[f][:16] for f in planner)


def max_observation_bytes(cameras: int, max_frame_bytes: int) -> int:
    """The server socket's message cap (ZMQ_MAXMSGSIZE): a bigger message drops its
    connection before it is buffered."""
    return cameras * max_frame_bytes + _STATE_BYTES


@dataclass(frozen=True)
class Sent:
    """What the relay remembers of an observation it sent, to check the plan that answers."""

    seq: int
    t_obs_ns: int
    t_send_ns: int
    episode: Any


def encode_observation(enc: Encoder, *, bundle: str, t_obs_ns: int,
                       states: tuple[np.ndarray, np.ndarray],
                       jpegs: Mapping[str, bytes | dict[str, Any]],
                       instruction: str, episode: Any, previous: Plan | None,
                       previous_waypoints: np.ndarray | None, expected_s: float,
                       **extra: Any) -> bytes:
    """`states`: (read times [m], values [len(FIELDS), m, n]) from StateHistory.rows_at.
    `jpegs`: one JPEG per camera, or (on one host: the shadow feed) the frame itself, packed
    (`pack_array`, uint8 [h, w, 3]). `extra`: keys a reader of this message adds (the shadow
    feed's active plan)."""
    prefix = None
    if previous is not None and previous_waypoints is not None:
        prefix = {"waypoints": pack_array(previous_waypoints.astype(np.float32)),
                  "dt_s": previous.dt, "t_obs_ns": round(previous.t0 * 1e9)}
    t, values = states
    return enc.encode("observation", {
        "bundle": bundle, "t_obs_ns": t_obs_ns,
        "state_t_ns": pack_array(t.astype("<i8")), "state": pack_array(values.astype("<f8")),
        "frames": jpegs, "instruction": instruction, "episode": episode,
        "prefix": prefix, "expected_s": expected_s, **extra})


@dataclass(frozen=True)
class Limits:
    """What the server accepts in an observation."""

    n_joints: int
    cameras: frozenset[str]
    max_frame_bytes: int
    max_frame_pixels: int
    # the shadow: the active planner's cameras, a superset of the candidate's, as raw frames
    more_cameras: bool = False
    raw_frames: bool = False


@dataclass(frozen=True)
class Received:
    """A decoded observation: its sender's seq and labels, and the pipeline's request."""

    seq: int
    bundle: str
    episode: Any
    request: PlanRequest
    message: dict[str, Any] = field(default_factory=dict, repr=False)  # the decoded map


def _text(msg: dict[str, Any], key: str, limit: int) -> str:
    value = msg.get(key)
    if type(value) is not str or len(value) > limit:
        raise MessageError("schema", f"{key}: text of at most {limit} characters expected")
    return value


def _episode(value: Any) -> Any:
    if value is None or is_int(value) or (type(value) is str and len(value) <= 200):
        return value
    raise MessageError("schema", "episode: an integer, a short text or nil")


def decode_observation(frame: bytes, lim: Limits) -> Received:
    msg = decode(frame, "observation")
    bundle = _text(msg, "bundle", 200)
    t_obs = msg.get("t_obs_ns")
    if not is_int(t_obs) or t_obs < 0:
        raise MessageError("schema", "t_obs_ns must be a non-negative integer")
    history = _states(msg, t_obs, lim.n_joints)
    frames = msg.get("frames")
    if not isinstance(frames, dict) or len(frames) > MAX_CAMERAS or not (
            set(frames) >= lim.cameras if lim.more_cameras else set(frames) == lim.cameras):
        got = sorted(map(str, frames)) if isinstance(frames, dict) else frames
        raise MessageError("frames", f"frames {got!r}, the model reads {sorted(lim.cameras)}")
    images = {}
    for name in lim.cameras:
        images[name] = _raw(frames[name], lim, name) if lim.raw_frames else \
            jpeg.decode(_bytes(frames[name], name), lim.max_frame_bytes, lim.max_frame_pixels,
                        f"frames.{name}")
    instruction = _text(msg, "instruction", MAX_INSTRUCTION_CHARS).strip()
    if not instruction:
        raise MessageError("schema", "instruction: empty (an idle robot sends nothing)")
    expected = msg.get("expected_s")
    if not is_real(expected) or not 0 <= expected <= MAX_EXPECTED_S:
        raise MessageError("schema", f"expected_s must be in [0, {MAX_EXPECTED_S}]")
    previous = _prefix(msg.get("prefix"), lim.n_joints)
    obs = Observation(images, history, t_obs, instruction)
    return Received(msg["seq"], bundle, _episode(msg.get("episode")),
                    PlanRequest(obs, previous, float(expected)), msg)


def _bytes(data: Any, name: str) -> bytes:
    if type(data) is not bytes:
        raise MessageError("frames", f"frames.{name}: not bytes")
    return data


def _raw(obj: Any, lim: Limits, name: str) -> np.ndarray:
    image = unpack_array(obj, f"frames.{name}")
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise MessageError("frames", f"frames.{name}: {image.dtype}{list(image.shape)}, "
                                     "expected uint8 [h, w, 3]")
    if image.shape[0] * image.shape[1] > lim.max_frame_pixels:
        raise MessageError("frames", f"frames.{name}: over {lim.max_frame_pixels} pixels")
    return image


def _states(msg: dict[str, Any], t_obs: int, n: int) -> StateHistory:
    t = unpack_array(msg.get("state_t_ns"), "state_t_ns")
    values = finite_array(msg.get("state"), "state")
    m = t.shape[0] if t.ndim == 1 else 0
    if t.dtype != np.dtype("<i8") or not 1 <= m <= MAX_STATE_ROWS:
        raise MessageError("shape", f"state_t_ns: int64 [1..{MAX_STATE_ROWS}] expected")
    if values.dtype != np.dtype("<f8") or values.shape != (len(FIELDS), m, n):
        raise MessageError("shape", f"state shape {list(values.shape)}, expected "
                                    f"[{len(FIELDS)}, {m}, {n}] float64")
    if (np.diff(t) <= 0).any() or t[0] < 0 or int(t[-1]) != t_obs:
        raise MessageError("time", "state times must increase and end at t_obs_ns")
    history = StateHistory(n, capacity=m)
    for k in range(m):
        history.add(int(t[k]), **{f: values[i, k] for i, f in enumerate(FIELDS)})
    return history


def _prefix(obj: Any, n: int) -> Plan | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise MessageError("schema", "prefix: a map or nil")
    w = finite_array(obj.get("waypoints"), "prefix.waypoints")
    dt, t0 = obj.get("dt_s"), obj.get("t_obs_ns")
    if not is_real(dt) or not is_int(t0):
        raise MessageError("schema", "prefix: a number dt_s and an integer t_obs_ns")
    try:
        check_chunk(w, float(dt), n)
    except PlanRejected as exc:
        raise MessageError(exc.kind, f"prefix: {exc}") from None
    return Plan(w, float(dt), t0 / 1e9, t0 / 1e9)


def encode_plan(enc: Encoder, waypoints: np.ndarray, dt_s: float, t_obs_ns: int,
                episode: Any, obs_seq: int, server_ms: float) -> bytes:
    """The server's answer: the plan for observation `obs_seq`, its t_obs echoed."""
    return enc.encode("plan", {
        "waypoints": pack_array(waypoints), "dt_s": dt_s, "t_obs_ns": t_obs_ns,
        "episode": episode, "obs_seq": obs_seq, "server_ms": round(server_ms, 3)})


def encode_refusal(enc: Encoder, obs_seq: int | None, kind: str, error: str) -> bytes:
    return enc.encode("reply", {"ok": False, "kind": kind, "error": error[:500],
                                "obs_seq": obs_seq})
