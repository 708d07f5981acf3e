"""MIT-mode CAN motors behind the `MotorBus` interface, on any python-can bus, classic or FD.

The bit layout and its rounding (truncation, as the firmware does) live in drivers/mit_codec.py;
how each motor family frames it (ids, status bits, temperatures, special and register frames)
in drivers/mit_dialects.py, chosen by `dialect`.

What `read` and `write` mean here, since MIT mode is one command -> one reply:
- `write` refuses (CommandError, nothing sent) a non-finite value or one outside the motor
  model's ranges, else sends one command frame per motor and returns; the replies stay queued.
- `read` collects the replies to the last `write` (the state the motors sampled when they got
  it). With no `write` outstanding it asks first: the last command again, or, before any
  command, the start-up query below.
- a motor whose reply has not arrived within `timeout_ms` is counted in
  `stats.missing_replies` and the read raises `BusError` naming it; a reply carrying a fault
  code (Damiao state nibble, CubeMars error byte) fills the state and raises `MotorFault`
  naming the motor and the fault.

Start-up never changes what an enabled motor is doing (a restarted follower must not move the
arm). The protocol cannot report the goal a motor holds, so it is reconstructed: a motor
applies tau = kp (p_des - q) + kd (v_des - dq) + t_ff, duet commands v_des = t_ff = 0, and a
reply reports the torque of the command before it, so

    goal = q + (tau + kd dq) / kp,   |goal - q| <= hold_jump_max_rad (the stated bound)

with q, dq and tau taken at the centre of their codes (a reply truncates each: its lower edge
is biased by half a code, and a velocity of zero decodes to -v_max/4095 there), and the goal
sent rounded to the nearest position code, so a re-held goal lands on the code the motor held
(within one code when the three quantisation errors add up past half a code).

The start-up query is the dialect's pure status frame where one exists: Damiao's refresh frame
(0x7FF .. CC), which reports torque too; MyActuator's "read multi-turn angle" (0x92), which
reports no torque, so a restart there holds the measured position (the arm moves by its
steady-state error, at most t_max / kp). The generic (Katz) and CubeMars protocols have none:
every frame a motor answers is a command. There the query is a zero-gain command, followed at
once by a hold command (the configured gains) at the reconstructed goal: a motor is limp for
one bus round trip (about 2 ms for six motors at 1 Mbit/s), then holds the goal to within the
torque field's quantisation / kp. Turning torque on sends the dialect's enable frame, then at
once the last command written since (or a hold at the reconstructed goal), so a motor never
runs a command left over in its firmware. `present_goal` returns True only where the protocol
says torque is on (Damiao) or this process turned it on.
"""

from __future__ import annotations

import time
from typing import Any

import can
import numpy as np

from drivers.bus import BusError, BusStats, CommandError, MotorFault, MotorState
from drivers.bus_budget import can_mit_tick_us
from drivers.mit_codec import COMMAND_DLC, MitRanges, pack_command_into
from drivers.mit_dialects import Frame, MitDialect, Reply, dialect_class, malformed

DEFAULT_HOLD_JUMP_MAX_RAD = 0.1
# a set-up exchange (enable, disable, zero, clear) whose answer is lost or late is sent again to
# the motors that did not answer: those frames are idempotent, and a lost frame must not stop a
# reset (the per-tick command is never resent: the next tick's is newer)
SETUP_ATTEMPTS = 3


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
        dialect: str = "generic",
        interface: str = "socketcan",
        channel: str = "can0",
        bitrate: int = 1_000_000,
        fd: bool = False,
        data_bitrate: int = 5_000_000,
        master_ids: list[int] | None = None,
        timeout_ms: float = 2.0,
        direction: list[int] | None = None,
        hold_jump_max_rad: float = DEFAULT_HOLD_JUMP_MAX_RAD,
        bus: can.BusABC | None = None,
    ) -> None:
        n = len(joint_names)
        if len(ids) != n or len(kp) != n or len(kd) != n:
            raise ValueError(f"MIT CAN bus: {n} joints need {n} ids, kp and kd;"
                             f" got {len(ids)}, {len(kp)}, {len(kd)}")
        self.dialect: MitDialect = dialect_class(dialect)(ids, master_ids)
        if fd and not self.dialect.supports_fd:
            raise ValueError(f"MIT CAN bus: dialect {dialect!r} speaks classic CAN only")
        if direction is not None and (len(direction) != n
                                      or any(d not in (1, -1) for d in direction)):
            raise ValueError(f"MIT CAN bus: direction must be {n} entries of +1/-1,"
                             f" got {direction}")
        if not (np.isfinite(timeout_ms) and 0 < timeout_ms <= 10_000):
            raise ValueError(f"MIT CAN bus: timeout_ms must be in (0, 10000], got {timeout_ms}")
        if not (np.isfinite(hold_jump_max_rad) and hold_jump_max_rad > 0):
            raise ValueError(f"MIT CAN bus: hold_jump_max_rad must be finite and > 0,"
                             f" got {hold_jump_max_rad}")
        self.joint_names = list(joint_names)
        self.stats = BusStats(per_motor_errors={name: 0 for name in joint_names})
        self.ranges = MitRanges.of(model)
        self.ids = list(ids)
        self.kp = np.asarray(kp, dtype=float)
        self.kd = np.asarray(kd, dtype=float)
        r = self.ranges
        if not (np.all(np.isfinite(self.kp)) and np.all(np.isfinite(self.kd))
                and np.all((self.kp >= 0) & (self.kp <= r.kp_max))
                and np.all((self.kd >= 0) & (self.kd <= r.kd_max))):
            raise ValueError(f"MIT CAN bus: kp must be in [0, {r.kp_max}] and kd in"
                             f" [0, {r.kd_max}] for this motor model")
        self.interface, self.channel, self.bitrate = interface, channel, bitrate
        self.fd, self.data_bitrate = fd, data_bitrate
        self.timeout_s = timeout_ms / 1000.0
        self.hold_jump_max_rad = float(hold_jump_max_rad)
        self.late_replies = 0  # replies that arrived after their transaction timed out
        self.hold_jumps_clipped = 0  # start-up goals that hit hold_jump_max_rad
        self._direction = np.asarray(direction if direction is not None else [1] * n, dtype=float)
        self._bus = bus
        self._owns_bus = bus is None
        # preallocated frames and per-transaction buffers
        self._frames = [self._message(self.dialect.command_id(j), bytes(COMMAND_DLC))
                        for j in range(n)]
        self._have_command = False  # self._frames hold a command of this process
        self._pending = False  # a write's replies are still to be collected
        self._torque_on: bool | None = None  # as this process last set it; None = unknown
        self._resend_ok = False  # the last command was written after torque last went off
        self._sent_ns = 0
        self._expect = np.ones(n, dtype=bool)
        self._got = np.zeros(n, dtype=bool)
        self._q = np.zeros(n)  # motor frame (before direction)
        self._dq = np.zeros(n)
        self._tau = np.zeros(n)
        self._code = np.zeros(n, dtype=np.int64)
        self._temp = np.full(n, np.nan)
        self._mit_fields = np.ones(n, dtype=bool)  # the last reply carried MIT state fields
        self._faulted = False  # a reply since the last fault check carried a fault code
        # half a code of each state field: the centre of a truncated code
        self._half_code = (r.p_max / 65535, r.v_max / 4095, r.t_max / 4095)
        self._last_q = np.zeros(n)  # joint frame: the q_target in self._frames
        self._zeros = np.zeros(n)
        self._reply = Reply()

    @classmethod
    def from_config(cls, bus_cfg: Any, joint_names: list[str], bus: can.BusABC | None = None
                    ) -> MitCanBus:
        """From a config object shaped like runtime.config.CanBusConfig."""
        return cls(joint_names, bus_cfg.ids, bus_cfg.model, bus_cfg.kp, bus_cfg.kd,
                   dialect=bus_cfg.dialect, interface=bus_cfg.interface,
                   channel=bus_cfg.channel, bitrate=bus_cfg.bitrate, fd=bus_cfg.fd,
                   data_bitrate=bus_cfg.data_bitrate, master_ids=bus_cfg.master_ids,
                   timeout_ms=bus_cfg.timeout_ms, direction=bus_cfg.direction,
                   hold_jump_max_rad=bus_cfg.hold_jump_max_rad, bus=bus)

    # -- lifecycle ---------------------------------------------------------------------------

    def open(self) -> None:
        """Open the CAN channel and check the motors' stored ranges (where a dialect has them).

        Sends nothing a motor acts on: a restarted follower must not move the arm.
        """
        if self._bus is None:
            kwargs: dict[str, Any] = {"fd": True, "data_bitrate": self.data_bitrate} \
                if self.fd else {}
            try:
                self._bus = can.Bus(interface=self.interface, channel=self.channel,
                                    bitrate=self.bitrate, **kwargs)
            except (can.CanError, OSError, ValueError) as exc:
                raise BusError(f"cannot open CAN {self.interface}:{self.channel}: {exc}") from exc
        self._have_command = self._resend_ok = self._pending = False
        self._torque_on = None
        self._code[:] = 0
        self._check_range_registers()

    def close(self) -> None:
        if self._bus is not None and self._owns_bus:
            self._bus.shutdown()
            self._bus = None

    def enable_torque(self, on: bool) -> None:
        """Turn every motor's torque on (or off) and wait for each one's answer.

        On: the dialect's enable frame to each motor not already reported enabled, then at once
        the last command written since torque was last turned off (or a hold at the
        reconstructed goal), so a motor never runs a command left over in its firmware.
        Off: the disable frame to every motor.
        """
        d = self.dialect
        n = len(self.ids)
        if not on:
            self._transact([d.disable(j) for j in range(n)], SETUP_ATTEMPTS)
            self._torque_on = False
            self._resend_ok = False
            if d.enable(0) is None:  # a command would start the motor again: query instead
                self._have_command = False
            return
        frames = [None if d.reports_torque_state and d.torque_on(int(self._code[j]))
                  else d.enable(j) for j in range(n)]
        if any(f is not None for f in frames):
            self._transact(frames, SETUP_ATTEMPTS)
        if not all(f is not None for f in frames) and not self._have_command:
            self._startup_query()  # learn where the motors are before commanding them
        if self._have_command and self._resend_ok:
            self._send_all()
            self._pending = False
            self._collect()
        else:
            self._pack_hold(self._hold_goal())
        self._torque_on = True

    def zero_position(self) -> None:
        """Make every motor's present position its zero (stored in the motor)."""
        self._transact(self._every(self.dialect.zero, "setting the zero position"),
                       SETUP_ATTEMPTS)

    def clear_errors(self) -> None:
        """Clear latched motor faults (Damiao: over-temperature, lost communication, ...)."""
        self._transact(self._every(self.dialect.clear_error, "clearing motor errors"),
                       SETUP_ATTEMPTS)

    def recover(self, motors: list[str]) -> None:
        """The dialect's clear-error frame to each named motor (Damiao FB; the motor stays
        off). The generic, CubeMars and MyActuator MIT protocols have none: their drivers
        latch a fault until the motor is power-cycled, which BusError says."""
        frames: list[Frame | None] = [None] * len(self.ids)
        for name in motors:
            j = self.joint_names.index(name)
            frames[j] = self.dialect.clear_error(j)
            if frames[j] is None:
                raise BusError(f"{name} (id {self.ids[j]}): the {self.dialect.name} MIT protocol"
                               " has no frame that clears a motor fault; power-cycle the motor,"
                               " then duet reset", name)
        self._transact(frames, SETUP_ATTEMPTS)

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
        collected by the next `read`. CommandError (nothing sent) for a value that is not
        finite or outside the motor model's range.
        """
        kp = self.kp if kp is None else kp
        kd = self.kd if kd is None else kd
        tau_ff = self._zeros if tau_ff is None else tau_ff
        dq_target = self._zeros if dq_target is None else dq_target
        r, sign = self.ranges, self._direction
        for j in range(len(self._frames)):  # all checked before any frame changes
            p, v, t = float(q_target[j]), float(dq_target[j]), float(tau_ff[j])
            kpj, kdj = float(kp[j]), float(kd[j])
            if not (-r.p_max <= p <= r.p_max and -r.v_max <= v <= r.v_max
                    and -r.t_max <= t <= r.t_max and 0.0 <= kpj <= r.kp_max
                    and 0.0 <= kdj <= r.kd_max):
                raise self._refusal(j, p, v, kpj, kdj, t)
        for j, frame in enumerate(self._frames):
            s = sign[j]
            pack_command_into(frame.data, s * q_target[j], s * dq_target[j], kp[j], kd[j],
                              s * tau_ff[j], r)
        np.copyto(self._last_q, q_target)
        self._have_command = self._resend_ok = True
        self._send_all()
        self.stats.writes += 1

    def read(self, out: MotorState) -> None:
        if not self._pending:
            if self._have_command:
                self._send_all()  # the last command again: changes nothing
            else:
                self._startup_query()
                self._fill(out)
                return
        self._pending = False
        self._collect()
        self._fill(out)

    def present_goal(self, out: np.ndarray) -> bool:
        """Where each motor holds now (see the module docstring for how, per dialect).

        Damiao reports torque on/off in every reply: True when on for every motor; a motor that
        is off reports its measured position. Other dialects: True only when this process
        turned torque on (`out` = its last command); after this process turned torque off,
        the measured position; at start-up (torque state unknown) the reconstructed hold goal
        (the measured position of a motor that is off, as it reports no torque), and False.
        """
        if self._have_command:
            self._send_all()  # the last command again: changes nothing
            self._pending = False
            self._collect()
            np.copyto(out, self._last_q)
        else:
            self._startup_query()
            np.copyto(out, self._last_q if self._have_command else self._hold_goal())
        self._raise_faults(None)
        d = self.dialect
        if d.reports_torque_state:
            on = np.array([d.torque_on(int(c)) for c in self._code])
        else:
            on = np.full(len(self.ids), self._torque_on is not False)
        np.copyto(out, self._q * self._direction, where=~on)
        return bool(on.all()) and (d.reports_torque_state or self._torque_on is True)

    def wire_time_us(self) -> float:
        """One command and one reply frame per motor, worst-case bit stuffing."""
        return can_mit_tick_us(self.bitrate, len(self.ids), COMMAND_DLC, self.dialect.reply_dlc,
                               self.fd, self.data_bitrate)

    # -- internals ---------------------------------------------------------------------------

    def _message(self, arbitration_id: int, data: bytes) -> can.Message:
        return can.Message(arbitration_id=arbitration_id, is_extended_id=False,
                           data=bytearray(data), is_fd=self.fd, bitrate_switch=self.fd)

    def _refusal(self, j: int, p: float, v: float, kp: float, kd: float, t: float
                 ) -> CommandError:
        r, name = self.ranges, self.joint_names[j]
        for field, value, lo, hi in (("q_target", p, -r.p_max, r.p_max),
                                     ("dq_target", v, -r.v_max, r.v_max),
                                     ("tau_ff", t, -r.t_max, r.t_max), ("kp", kp, 0.0, r.kp_max),
                                     ("kd", kd, 0.0, r.kd_max)):
            if not lo <= value <= hi:
                return CommandError(f"{name} (id {self.ids[j]}): {field} = {value} is not finite"
                                    f" or outside the motor's range [{lo:g}, {hi:g}]", name)
        return CommandError(f"{name}: command refused", name)  # unreachable by construction

    def _every(self, frame_of: Any, what: str) -> list[Frame | None]:
        frames = [frame_of(j) for j in range(len(self.ids))]
        if any(f is None for f in frames):
            raise BusError(f"MIT dialect {self.dialect.name!r} has no frame for {what}")
        return frames

    def _fill(self, out: MotorState) -> None:
        sign = self._direction
        np.multiply(self._q, sign, out=out.q)
        np.multiply(self._dq, sign, out=out.dq)
        np.multiply(self._tau, sign, out=out.effort)
        np.copyto(out.temperature_c, self._temp)
        out.t_ns = self._sent_ns
        self.stats.reads += 1
        self._raise_faults(out)

    def _raise_faults(self, out: MotorState | None) -> None:
        d = self.dialect
        if out is not None:
            out.error_flags[:] = 0
        if not self._faulted:  # no reply since the last check carried a fault code
            return
        self._faulted = False
        faults = None
        for j, code in enumerate(self._code):
            reason = d.fault(int(code)) if code else None
            if reason is None:
                continue
            if out is not None:
                out.error_flags[j] = code
            faults = faults or []
            faults.append(f"{self.joint_names[j]} (id {self.ids[j]}): {reason}")
        if faults:
            first = faults[0].split(" (", 1)[0]
            raise MotorFault(f"motor fault ({d.name}): " + "; ".join(faults), first)

    def _hold_goal(self) -> np.ndarray:
        """Joint-frame goal each motor holds, reconstructed from its last reply."""
        hp, hv, ht = self._half_code
        centre = self._mit_fields.astype(float)
        q = self._q + hp * centre
        with np.errstate(divide="ignore", invalid="ignore"):
            step = np.where(self.kp > 0, (self._tau + ht * centre
                                          + self.kd * (self._dq + hv * centre)) / self.kp, 0.0)
        step = np.nan_to_num(step, nan=0.0, posinf=0.0, neginf=0.0)
        clipped = np.clip(step, -self.hold_jump_max_rad, self.hold_jump_max_rad)
        self.hold_jumps_clipped += int(np.count_nonzero(clipped != step))
        return (q + clipped) * self._direction

    def _startup_query(self) -> None:
        """Ask every motor for its state without changing what it does (module docstring)."""
        d = self.dialect
        queries = [d.query(j) for j in range(len(self.ids))]
        if all(f is not None for f in queries):
            self._transact(queries)
            return
        for frame in self._frames:  # zero gains, zero torque: "where are you?"
            pack_command_into(frame.data, 0.0, 0.0, 0.0, 0.0, 0.0, self.ranges)
        self._send_all()
        self._pending = False
        self._collect()
        self._pack_hold(self._hold_goal())

    def _pack_hold(self, goal: np.ndarray) -> None:
        """Command `goal` (joint frame) with the configured gains now; it becomes the last
        command. The position goes out rounded to the nearest code (it is an estimate of a
        code the motor held, not a new target)."""
        goal = np.clip(goal, -self.ranges.p_max, self.ranges.p_max)
        half = self._half_code[0]
        for j, frame in enumerate(self._frames):
            s = self._direction[j]
            pack_command_into(frame.data, s * goal[j] + half, 0.0, self.kp[j], self.kd[j], 0.0,
                              self.ranges)
        np.copyto(self._last_q, goal)
        self._have_command = self._resend_ok = True
        self._send_all()
        self._pending = False
        self._collect()

    def _require_bus(self) -> can.BusABC:
        if self._bus is None:
            raise BusError("MIT CAN bus is not open")
        return self._bus

    def _drain(self) -> None:
        bus = self._require_bus()
        # replies left over from a timed-out transaction would pass for this one's
        while (late := bus.recv(0.0)) is not None:
            if self._intact(late) and self.dialect.motor_of(late) >= 0:
                self.late_replies += 1

    def _send(self, messages: list[can.Message]) -> None:
        bus = self._require_bus()
        self._drain()
        self._sent_ns = time.monotonic_ns()
        try:
            for msg in messages:
                bus.send(msg)
        except can.CanError as exc:
            self.stats.errors += 1
            raise BusError(f"CAN send on {self.channel} failed: {exc}") from exc
        self._pending = True

    def _send_all(self) -> None:
        self._expect[:] = True
        self._send(self._frames)

    def _transact(self, frames: list[Frame | None], attempts: int = 1) -> None:
        """Send the given frame to each motor (None: skip that motor), collect their answers;
        the motors that did not answer are asked again (`attempts` in all)."""
        for attempt in range(1, attempts + 1):
            for j, f in enumerate(frames):
                self._expect[j] = f is not None
            self._send([self._message(*f) for f in frames if f is not None])
            self._pending = False
            try:
                self._collect(final=attempt == attempts)
                return
            except BusError:
                if attempt == attempts:
                    raise
                self.stats.retries += 1
                frames = [None if self._got[j] else f for j, f in enumerate(frames)]

    def _collect(self, final: bool = True) -> None:
        """The expected motors' answers within the timeout; BusError names the silent ones
        (`final`: the exchange is not asked again, so it counts as a failed one)."""
        bus = self._require_bus()
        d, r, reply = self.dialect, self.ranges, self._reply
        expect, got = self._expect, self._got
        got[:] = False
        deadline = time.monotonic() + self.timeout_s
        remaining = int(np.count_nonzero(expect))
        while remaining:
            msg = bus.recv(max(deadline - time.monotonic(), 0.0))
            if msg is None:  # recv waited out the deadline
                break
            if not self._intact(msg):
                continue
            j = d.motor_of(msg)
            if j < 0 or not expect[j]:
                continue
            if d.parse(msg, r, reply):
                self._q[j], self._dq[j], self._tau[j] = reply.p, reply.v, reply.t
                self._code[j], self._temp[j] = reply.code, reply.temperature_c
                self._mit_fields[j] = reply.mit_fields
                if reply.code and d.fault(reply.code) is not None:
                    self._faulted = True
            if not got[j]:
                got[j] = True
                remaining -= 1
        if remaining:
            self._fail_missing(final)

    def _intact(self, msg: can.Message) -> bool:
        """False for a frame that cannot be decoded, counted by reason in stats.dropped_frames."""
        reason = malformed(msg)
        if reason is None:
            return True
        dropped = self.stats.dropped_frames
        dropped[reason] = dropped.get(reason, 0) + 1
        return False

    def _fail_missing(self, final: bool) -> None:
        silent = np.flatnonzero(self._expect & ~self._got)
        missing = [self.joint_names[j] for j in silent]
        self.stats.missing_replies += len(missing)
        self.stats.timeouts += 1
        self.stats.errors += final
        for name in missing:
            self.stats.per_motor_errors[name] += 1
        names = ", ".join(f"{self.joint_names[j]} (id {self.ids[j]})" for j in silent)
        raise BusError(f"no MIT reply within {self.timeout_s * 1e3:g} ms from {names}",
                       motor=missing[0])

    def _check_range_registers(self, attempts: int = 3) -> None:
        """Refuse to start when a motor's stored ranges differ from the configured model: every
        position, velocity and torque would be scaled wrong. A start-up read, so a motor that
        does not answer is asked again (`attempts` in all) before it is named."""
        d = self.dialect
        for key, rid in d.range_registers.items():
            want = float(getattr(self.ranges, key))
            values: list[float | None] = [None] * len(self.ids)
            for _ in range(attempts):
                frames = [d.read_register(j, rid) for j, v in enumerate(values) if v is None]
                self._send([self._message(*f) for f in frames if f is not None])
                self._pending = False
                self._collect_registers(rid, values)
                if all(v is not None for v in values):
                    break
            reg = getattr(d, "REGISTER_NAMES", {}).get(rid, str(rid))
            for j, value in enumerate(values):
                name = f"{self.joint_names[j]} (id {self.ids[j]})"
                if value is None:
                    raise BusError(f"{name}: no reply to reading register {reg} ({rid}) within"
                                   f" {self.timeout_s * 1e3:g} ms, {attempts} times",
                                   self.joint_names[j])
                # the motor stores float32: compare at its precision
                if abs(value - want) > 1e-6 * max(abs(want), 1.0):
                    raise BusError(
                        f"{name}: the motor's {reg} (register {rid}) is {value:g} but"
                        f" model.{key} is {want:g}: every {key[0]} on the wire would be scaled"
                        f" wrong. Set model.{key} to {value:g} or write the motor's {reg}.",
                        self.joint_names[j])

    def _collect_registers(self, rid: int, values: list[float | None]) -> None:
        bus = self._require_bus()
        deadline = time.monotonic() + self.timeout_s
        while any(v is None for v in values):
            msg = bus.recv(max(deadline - time.monotonic(), 0.0))
            if msg is None:
                break
            if not self._intact(msg):
                continue
            for j in range(len(values)):
                if values[j] is None:
                    value = self.dialect.register_value(msg, j, rid)
                    if value is not None:
                        values[j] = value
                        break
