"""MIT-mode CAN motors (Ben Katz's mini-cheetah protocol, as spoken by Damiao, CubeMars,
MyActuator, ...) behind the `MotorBus` interface, on any python-can bus.

Wire format, big-endian bit fields, each float mapped linearly onto an unsigned integer
over the motor model's range (position [-p_max, p_max], velocity [-v_max, v_max],
torque [-t_max, t_max], kp [0, kp_max], kd [0, kd_max]); out-of-range values are clamped:

    command (8 bytes, to the motor's id):  p16 | v12 kp12 | kd12 t12
    reply   (6 bytes):                     id8 | p16 | v12 t12
    special (8 bytes):  FF FF FF FF FF FF FF FC enter motor mode, ...FD exit, ...FE zero here

A motor answers every frame with one reply. The reply's first byte names the motor; when
`master_ids` is configured (Damiao: replies come on a per-motor master id) the arbitration
id names it instead.

What `read` and `write` mean here, since MIT mode is one command -> one reply:
- `write` sends one command frame per motor and returns; the replies are left queued.
- `read` collects the replies to the last `write` (the state the motors sampled when they
  received it). With no `write` outstanding (the first read after `open`, or two reads in
  a row) it sends a query first: the last command again, or, before any command, a
  zero-gain zero-torque frame that only asks for the position.
- a motor whose reply has not arrived within `timeout_ms` is counted in
  `stats.missing_replies` and the read raises `BusError` naming it.
"""

from __future__ import annotations

import time
from typing import Any

import can
import numpy as np

from drivers.bus import BusError, BusStats, MotorState
from drivers.bus_budget import can_mit_tick_us

ENTER_MOTOR_MODE = bytes([0xFF] * 7 + [0xFC])
EXIT_MOTOR_MODE = bytes([0xFF] * 7 + [0xFD])
ZERO_POSITION = bytes([0xFF] * 7 + [0xFE])
SPECIAL_FRAMES = frozenset({ENTER_MOTOR_MODE, EXIT_MOTOR_MODE, ZERO_POSITION})
COMMAND_DLC = 8
REPLY_DLC = 6

_U16 = (1 << 16) - 1
_U12 = (1 << 12) - 1


class MitRanges:
    """Field ranges of one motor model (duck-types runtime.config.MitMotorModel)."""

    __slots__ = ("kd_max", "kp_max", "p_max", "t_max", "v_max")

    def __init__(
        self, p_max: float, v_max: float, t_max: float, kp_max: float = 500.0, kd_max: float = 5.0
    ) -> None:
        for name, value in (("p_max", p_max), ("v_max", v_max), ("t_max", t_max),
                            ("kp_max", kp_max), ("kd_max", kd_max)):
            if not (np.isfinite(value) and value > 0):
                raise ValueError(f"MIT motor model: {name} must be finite and > 0, got {value}")
        self.p_max, self.v_max, self.t_max = float(p_max), float(v_max), float(t_max)
        self.kp_max, self.kd_max = float(kp_max), float(kd_max)

    @classmethod
    def of(cls, model: Any) -> MitRanges:
        """From any object with p_max, v_max, t_max, kp_max, kd_max attributes."""
        if isinstance(model, MitRanges):
            return model
        return cls(model.p_max, model.v_max, model.t_max, model.kp_max, model.kd_max)

    def __repr__(self) -> str:
        return (f"MitRanges(p_max={self.p_max}, v_max={self.v_max}, t_max={self.t_max},"
                f" kp_max={self.kp_max}, kd_max={self.kd_max})")


def float_to_uint(x: float, lo: float, hi: float, bits: int) -> int:
    """Clamp x to [lo, hi] and map it onto 0 .. 2**bits - 1 (rounded to nearest)."""
    if x != x:  # NaN has no place on the wire; +-inf clamps like any out-of-range value
        raise ValueError("MIT field cannot encode NaN")
    top = (1 << bits) - 1
    x = min(max(x, lo), hi)
    return int((x - lo) * top / (hi - lo) + 0.5)


def uint_to_float(u: int, lo: float, hi: float, bits: int) -> float:
    return u * (hi - lo) / ((1 << bits) - 1) + lo


def pack_command_into(
    buf: bytearray, p: float, v: float, kp: float, kd: float, t: float, r: MitRanges
) -> None:
    """Write the 8-byte command into `buf` in place (the tick path allocates no frames)."""
    pi = float_to_uint(p, -r.p_max, r.p_max, 16)
    vi = float_to_uint(v, -r.v_max, r.v_max, 12)
    kpi = float_to_uint(kp, 0.0, r.kp_max, 12)
    kdi = float_to_uint(kd, 0.0, r.kd_max, 12)
    ti = float_to_uint(t, -r.t_max, r.t_max, 12)
    buf[0], buf[1] = pi >> 8, pi & 0xFF
    buf[2], buf[3], buf[4] = vi >> 4, ((vi & 0xF) << 4) | (kpi >> 8), kpi & 0xFF
    buf[5], buf[6], buf[7] = kdi >> 4, ((kdi & 0xF) << 4) | (ti >> 8), ti & 0xFF


def pack_command(p: float, v: float, kp: float, kd: float, t: float, r: MitRanges) -> bytes:
    buf = bytearray(COMMAND_DLC)
    pack_command_into(buf, p, v, kp, kd, t, r)
    return bytes(buf)


def unpack_command(
    data: bytes | bytearray, r: MitRanges
) -> tuple[float, float, float, float, float]:
    """(p, v, kp, kd, t) from an 8-byte command frame."""
    if len(data) != COMMAND_DLC:
        raise ValueError(f"MIT command has {COMMAND_DLC} bytes, got {len(data)}")
    pi = (data[0] << 8) | data[1]
    vi = (data[2] << 4) | (data[3] >> 4)
    kpi = ((data[3] & 0xF) << 8) | data[4]
    kdi = (data[5] << 4) | (data[6] >> 4)
    ti = ((data[6] & 0xF) << 8) | data[7]
    return (uint_to_float(pi, -r.p_max, r.p_max, 16), uint_to_float(vi, -r.v_max, r.v_max, 12),
            uint_to_float(kpi, 0.0, r.kp_max, 12), uint_to_float(kdi, 0.0, r.kd_max, 12),
            uint_to_float(ti, -r.t_max, r.t_max, 12))


def pack_reply(motor_id: int, p: float, v: float, t: float, r: MitRanges) -> bytes:
    if not 0 <= motor_id <= 0xFF:
        raise ValueError(f"MIT reply carries an 8-bit motor id, got {motor_id}")
    pi = float_to_uint(p, -r.p_max, r.p_max, 16)
    vi = float_to_uint(v, -r.v_max, r.v_max, 12)
    ti = float_to_uint(t, -r.t_max, r.t_max, 12)
    return bytes((motor_id, pi >> 8, pi & 0xFF, vi >> 4, ((vi & 0xF) << 4) | (ti >> 8), ti & 0xFF))


def unpack_reply(data: bytes | bytearray, r: MitRanges) -> tuple[int, float, float, float]:
    """(motor id, p, v, t) from a reply; bytes past the sixth (temperatures) are ignored."""
    if len(data) < REPLY_DLC:
        raise ValueError(f"MIT reply has at least {REPLY_DLC} bytes, got {len(data)}")
    pi = (data[1] << 8) | data[2]
    vi = (data[3] << 4) | (data[4] >> 4)
    ti = ((data[4] & 0xF) << 8) | data[5]
    return (data[0], uint_to_float(pi, -r.p_max, r.p_max, 16),
            uint_to_float(vi, -r.v_max, r.v_max, 12), uint_to_float(ti, -r.t_max, r.t_max, 12))


class MitCanBus:
    """`MotorBus` over MIT-mode motors on one python-can bus (see the module docstring)."""

    def __init__(
        self,
        joint_names: list[str],
        ids: list[int],
        model: Any,
        kp: list[float],
        kd: list[float],
        *,
        interface: str = "socketcan",
        channel: str = "can0",
        bitrate: int = 1_000_000,
        master_ids: list[int] | None = None,
        timeout_ms: float = 2.0,
        direction: list[int] | None = None,
        bus: can.BusABC | None = None,
    ) -> None:
        n = len(joint_names)
        if len(ids) != n or len(kp) != n or len(kd) != n:
            raise ValueError(f"MIT CAN bus: {n} joints need {n} ids, kp and kd;"
                             f" got {len(ids)}, {len(kp)}, {len(kd)}")
        if len(set(ids)) != n or not all(0 < i < 0x800 for i in ids):
            raise ValueError(f"MIT CAN bus: ids must be distinct 11-bit ids > 0, got {ids}")
        if master_ids is not None and (len(master_ids) != n or len(set(master_ids)) != n):
            raise ValueError(f"MIT CAN bus: master_ids must be {n} distinct ids, got {master_ids}")
        if master_ids is None and not all(i <= 0xFF for i in ids):
            raise ValueError("MIT CAN bus: replies name the motor in one byte; ids above 255"
                             " need master_ids")
        if direction is not None and (len(direction) != n
                                      or any(d not in (1, -1) for d in direction)):
            raise ValueError(f"MIT CAN bus: direction must be {n} entries of +1/-1,"
                             f" got {direction}")
        self.joint_names = list(joint_names)
        self.stats = BusStats(per_motor_errors={name: 0 for name in joint_names})
        self.ranges = MitRanges.of(model)
        self.ids = list(ids)
        self.kp = np.asarray(kp, dtype=float)
        self.kd = np.asarray(kd, dtype=float)
        if np.any(self.kp < 0) or np.any(self.kp > self.ranges.kp_max) or np.any(self.kd < 0) \
                or np.any(self.kd > self.ranges.kd_max):
            raise ValueError(f"MIT CAN bus: kp must be in [0, {self.ranges.kp_max}] and kd in"
                             f" [0, {self.ranges.kd_max}] for this motor model")
        self.interface, self.channel, self.bitrate = interface, channel, bitrate
        self.timeout_s = timeout_ms / 1000.0
        self.late_replies = 0  # replies that arrived after their transaction timed out
        self._direction = np.asarray(direction if direction is not None else [1] * n, dtype=float)
        # reply key (arbitration id with master_ids, else the first data byte) -> motor index
        self._by_master = master_ids is not None
        keys = master_ids if master_ids is not None else ids
        self._index = {k: j for j, k in enumerate(keys)}
        self._bus = bus
        self._owns_bus = bus is None
        # preallocated frames and per-transaction buffers
        self._frames = [can.Message(arbitration_id=i, is_extended_id=False,
                                    data=bytearray(COMMAND_DLC)) for i in self.ids]
        self._have_command = False
        self._pending = False  # a write's replies are still to be collected
        self._sent_ns = 0
        self._got = np.zeros(n, dtype=bool)
        self._q = np.zeros(n)
        self._dq = np.zeros(n)
        self._tau = np.zeros(n)
        self._zeros = np.zeros(n)

    @classmethod
    def from_config(cls, bus_cfg: Any, joint_names: list[str], bus: can.BusABC | None = None
                    ) -> MitCanBus:
        """From a config object shaped like runtime.config.CanBusConfig."""
        return cls(joint_names, bus_cfg.ids, bus_cfg.model, bus_cfg.kp, bus_cfg.kd,
                   interface=bus_cfg.interface, channel=bus_cfg.channel, bitrate=bus_cfg.bitrate,
                   master_ids=bus_cfg.master_ids, timeout_ms=bus_cfg.timeout_ms,
                   direction=bus_cfg.direction, bus=bus)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        if self._bus is None:
            try:
                self._bus = can.Bus(interface=self.interface, channel=self.channel,
                                    bitrate=self.bitrate)
            except (can.CanError, OSError, ValueError) as exc:
                raise BusError(f"cannot open CAN {self.interface}:{self.channel}: {exc}") from exc
        self._have_command = False
        self._pending = False

    def close(self) -> None:
        if self._bus is not None and self._owns_bus:
            self._bus.shutdown()
            self._bus = None

    def enable_torque(self, on: bool) -> None:
        """Enter (or exit) motor mode on every motor and wait for each one's reply."""
        self._transact_special(ENTER_MOTOR_MODE if on else EXIT_MOTOR_MODE)
        # a motor entering motor mode must not jump to an old target: the next read queries
        self._have_command = False

    def zero_position(self) -> None:
        """Make every motor's present position its zero (stored in the motor)."""
        self._transact_special(ZERO_POSITION)

    # -- the tick ----------------------------------------------------------------------------

    def write(
        self,
        q_target: np.ndarray,
        kp: np.ndarray | None = None,
        kd: np.ndarray | None = None,
        tau_ff: np.ndarray | None = None,
        dq_target: np.ndarray | None = None,
    ) -> None:
        """Send one MIT command per motor: tau = kp (q_target - q) + kd (dq_target - dq) + tau_ff.

        kp/kd default to the configured gains, tau_ff and dq_target to zero. The replies are
        collected by the next `read`.
        """
        kp = self.kp if kp is None else kp
        kd = self.kd if kd is None else kd
        tau_ff = self._zeros if tau_ff is None else tau_ff
        dq_target = self._zeros if dq_target is None else dq_target
        r, sign = self.ranges, self._direction
        for j, frame in enumerate(self._frames):
            pack_command_into(frame.data, sign[j] * q_target[j], sign[j] * dq_target[j],
                              kp[j], kd[j], sign[j] * tau_ff[j], r)
        self._have_command = True
        self._send_all()
        self.stats.writes += 1

    def read(self, out: MotorState) -> None:
        if not self._pending:
            if not self._have_command:
                for frame in self._frames:  # zero gains, zero torque: "where are you?"
                    pack_command_into(frame.data, 0.0, 0.0, 0.0, 0.0, 0.0, self.ranges)
            self._send_all()
        self._pending = False
        self._collect()
        sign = self._direction
        np.multiply(self._q, sign, out=out.q)
        np.multiply(self._dq, sign, out=out.dq)
        np.multiply(self._tau, sign, out=out.effort)
        out.error_flags[:] = 0
        out.t_ns = self._sent_ns
        self.stats.reads += 1

    def wire_time_us(self) -> float:
        """One command and one reply frame per motor, worst-case bit stuffing."""
        return can_mit_tick_us(self.bitrate, len(self.ids), COMMAND_DLC, REPLY_DLC)

    # -- internals ---------------------------------------------------------------------------

    def _require_bus(self) -> can.BusABC:
        if self._bus is None:
            raise BusError("MIT CAN bus is not open")
        return self._bus

    def _send_all(self) -> None:
        bus = self._require_bus()
        # replies left over from a timed-out transaction would pass for this one's
        while (late := bus.recv(0.0)) is not None:
            if self._key(late) is not None:
                self.late_replies += 1
        self._sent_ns = time.monotonic_ns()
        try:
            for frame in self._frames:
                bus.send(frame)
        except can.CanError as exc:
            self.stats.errors += 1
            raise BusError(f"CAN send on {self.channel} failed: {exc}") from exc
        self._pending = True

    def _key(self, msg: can.Message) -> int | None:
        """Index of the motor a reply belongs to, None for anything else on the bus."""
        if msg.is_error_frame or msg.is_remote_frame or msg.dlc < REPLY_DLC:
            return None
        return self._index.get(msg.arbitration_id if self._by_master else msg.data[0])

    def _collect(self) -> None:
        bus = self._require_bus()
        got = self._got
        got[:] = False
        deadline = time.monotonic() + self.timeout_s
        remaining = len(got)
        while remaining:
            msg = bus.recv(max(deadline - time.monotonic(), 0.0))
            if msg is None:  # recv waited out the deadline
                break
            j = self._key(msg)
            if j is None:
                continue
            _, self._q[j], self._dq[j], self._tau[j] = unpack_reply(msg.data, self.ranges)
            if not got[j]:
                got[j] = True
                remaining -= 1
        if remaining:
            self._fail_missing()

    def _fail_missing(self) -> None:
        silent = np.flatnonzero(~self._got)
        missing = [self.joint_names[j] for j in silent]
        self.stats.missing_replies += len(missing)
        self.stats.timeouts += 1
        self.stats.errors += 1
        for name in missing:
            self.stats.per_motor_errors[name] += 1
        names = ", ".join(f"{self.joint_names[j]} (id {self.ids[j]})" for j in silent)
        raise BusError(f"no MIT reply within {self.timeout_s * 1e3:g} ms from {names}",
                       motor=missing[0])

    def _transact_special(self, payload: bytes) -> None:
        for frame in self._frames:
            frame.data[:] = payload
        self._send_all()
        self._pending = False
        self._collect()
