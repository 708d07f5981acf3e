"""The serial-bus servo driver both serial protocols run on (drivers/dynamixel.py: Dynamixel
Protocol 2.0, drivers/feetech.py: Feetech FT-SCS): one half-duplex line, servos in position
mode, answering in the order they are asked.

One tick is two transactions: `read()` = one SYNC READ of a block of present values for every
servo, `write()` = one SYNC WRITE of Goal Position. A read that fails for some servos (a
corrupt or lost reply) keeps the other servos' replies and retries a SYNC READ of the failed
ones only (and the servo after them, whose reply settles a silent one without waiting out the
timeout). Both packets are prebuilt; the hot path fills preallocated byte and numpy buffers in
place, talks to the port's file descriptor directly (poll + readv), so it allocates no buffers
per call. A status that reports a hardware error raises MotorFault naming the joint, its id
and the error's bits.

What a family differs in is data and small hooks: its codec module (`proto`: packets, the
stream and sync-reply parsers, LOST_REPLY), its register addresses, the block it reads per
tick and how it decodes it (`_decode`), how a packet is sealed (CRC or checksum), how a
status says "hardware error" and which bits name it, and the setup `open()` does per servo.
"""

from __future__ import annotations

import os
import select
import termios
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar, TypeVar

import numpy as np
import serial

from drivers.bus import BusError, BusStats, CommandError, MotorFault, MotorState

_POLL_BAD = select.POLLHUP | select.POLLERR | select.POLLNVAL
_Bus = TypeVar("_Bus", bound="SerialServoBus")


class SerialServoBus:
    """`MotorBus` over serial-bus servos in position mode; a family subclasses it."""

    family: ClassVar[str]  # "Dynamixel", "Feetech": in messages
    proto: ClassVar[ModuleType]  # the family's wire codec (drivers/*_protocol.py)
    read_addr: ClassVar[int]  # the block the tick's SYNC READ asks every servo for
    read_len: ClassVar[int]
    addr_torque: ClassVar[int]  # Torque Enable
    addr_goal: ClassVar[int]  # Goal Position
    addr_present: ClassVar[int]  # Present Position
    position_bytes: ClassVar[int]  # the size of Goal and Present Position
    seal_bytes: ClassVar[int]  # the CRC or checksum that ends a packet
    fault_mask: ClassVar[int]  # status error bits that say "hardware error"

    def __init__(self, device: str, baudrate: int, ids: Sequence[int],
                 joint_names: Sequence[str], zero_ticks: Sequence[int] | None,
                 direction: Sequence[int] | None, timeout_ms: float, retries: int,
                 return_delay_us: float, *, center_ticks: int, max_ticks: int,
                 ticks_per_rad: float, speed_unit: float, effort_unit: float,
                 goal_dtype: str) -> None:
        n = len(ids)
        max_id = self.proto.MAX_ID
        if n == 0 or len(joint_names) != n:
            raise ValueError(f"{n} ids for {len(joint_names)} joints")
        if len(set(ids)) != n or not all(0 <= i <= max_id for i in ids):
            raise ValueError(f"ids must be unique and in 0..{max_id}: {', '.join(map(str, ids))}")
        zero = list(zero_ticks) if zero_ticks is not None else [center_ticks] * n
        sign = list(direction) if direction is not None else [1] * n
        if len(zero) != n or len(sign) != n:
            raise ValueError("zero_ticks and direction need one entry per joint")
        if any(d not in (1, -1) for d in sign):
            raise ValueError(f"direction entries must be +1 or -1: {sign}")
        if timeout_ms <= 0 or retries < 0 or baudrate <= 0:
            raise ValueError("timeout_ms and baudrate must be > 0, retries >= 0")
        self.device = device
        self.baudrate = baudrate
        self.ids = list(ids)
        self.joint_names = list(joint_names)
        self.n = n
        self.timeout_ms = timeout_ms
        self.retries = retries
        self.return_delay_us = [return_delay_us] * n  # replaced by the servos' values at open()
        self.stats = BusStats(per_motor_errors={name: 0 for name in self.joint_names})
        self.last_reply_bytes = 0  # bytes the last sync read took off the line (the bench's)
        self._index_by_id = {servo_id: k for k, servo_id in enumerate(self.ids)}
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._poller = select.poll()

        # unit conversions, per joint
        sign_f = np.array(sign, dtype=float)
        self._zero = np.array(zero, dtype=float)
        self._q_per_tick = sign_f / ticks_per_rad
        self._tick_per_q = sign_f * ticks_per_rad
        self._dq_per_unit = sign_f * speed_unit
        self._effort_per_unit = sign_f * effort_unit
        self._goal_lo = np.zeros(n)
        self._goal_hi = np.full(n, float(max_ticks))

        # hot-path buffers
        self._reply_bytes = self.proto.STATUS_OVERHEAD + self.read_len
        self._sync_read = self.proto.sync_read_packet(self.read_addr, self.read_len, self.ids)
        self._rx = bytearray(4 * n * self._reply_bytes + 64)  # room for stuffing, stray bytes
        self._rx_view = memoryview(self._rx)
        self._pos_raw = np.zeros(n)
        self._vel_raw = np.zeros(n)
        self._eff_raw = np.zeros(n)
        self._temp = np.full(n, np.nan)
        self._replies = self.proto.SyncReplyParser(self.ids, self.read_len)
        self._everyone = list(range(n))
        self._faulty = [False] * n  # the last status reported a hardware error
        self._status_error = [0] * n
        self._goal_f = np.zeros(n)
        self._finite = np.zeros(n, dtype=bool)
        # Goal Position stays within the servo's limits, so the packet's layout is fixed (no
        # stuffing, no sign bit) and its goal fields are a numpy view into it
        self._sync_write = bytearray(self.proto.sync_write_packet(
            self.addr_goal, self.position_bytes, {i: bytes(self.position_bytes) for i in ids}))
        self._seal_at = len(self._sync_write) - self.seal_bytes
        slot = np.dtype([("id", "u1"), ("goal", goal_dtype)])
        self._goal_ticks = np.frombuffer(self._sync_write, dtype=slot, count=n,
                                         offset=self._seal_at - n * slot.itemsize)["goal"]
        self._parser = self.proto.StreamParser()
        self._error = ""
        self._error_motor: str | None = None

    @classmethod
    def from_config(cls: type[_Bus], bus_cfg: Any, joint_names: Sequence[str]) -> _Bus:
        """Build from the family's bus config (duck-typed: drivers never import runtime)."""
        return cls(device=bus_cfg.device, baudrate=bus_cfg.baudrate, ids=bus_cfg.ids,
                   joint_names=joint_names, zero_ticks=bus_cfg.zero_ticks,
                   direction=bus_cfg.direction, timeout_ms=bus_cfg.timeout_ms,
                   retries=bus_cfg.retries, return_delay_us=bus_cfg.return_delay_us,
                   **cls._config_options(bus_cfg))

    @classmethod
    def _config_options(cls, bus_cfg: Any) -> dict[str, Any]:
        """The family's own constructor arguments from its bus config."""
        return {}

    def _label(self, k: int) -> str:
        return f"{self.joint_names[k]} (id {self.ids[k]})"

    # ---- the family's hooks ----------------------------------------------------------------

    def _setup(self, k: int, servo_id: int) -> None:
        """open(): check servo k's setup, read its limits and return delay, select position
        mode."""
        raise NotImplementedError

    def _decode(self, k: int, buf: bytes | bytearray, at: int) -> None:
        """Servo k's present values from its reply's data at buf[at:] into the raw buffers."""
        raise NotImplementedError

    def _position_at(self, block: bytes, at: int) -> int:
        """A Goal or Present Position field, in ticks."""
        raise NotImplementedError

    def _seal(self, packet: bytearray) -> None:
        """Write the packet's CRC or checksum (its last `seal_bytes`) in place."""
        raise NotImplementedError

    def _is_answer(self, reply: Any, servo_id: int) -> bool:
        """Whether a parsed packet is `servo_id`'s status; it raises BusError for a status that
        refuses the instruction where the protocol says so."""
        raise NotImplementedError

    def _fault_bits(self, k: int, status_error: int) -> int:
        """The hardware error bits of servo k, whose status reported one."""
        raise NotImplementedError

    def _fault_names(self, bits: int) -> list[str]:
        raise NotImplementedError

    def read_register(self, servo_id: int, address: int, size: int) -> int:
        raise NotImplementedError

    def write_register(self, servo_id: int, address: int, size: int, value: int) -> int:
        """WRITE one register; the status error byte (0 where the servo does not answer)."""
        raise NotImplementedError

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open the port, ping every servo, check its setup, select position mode."""
        try:
            self._serial = serial.Serial(self.device, self.baudrate, timeout=0)
        except (serial.SerialException, OSError) as exc:
            raise BusError(f"cannot open {self.device}: {exc}") from exc
        try:  # USB adapters (FTDI) otherwise batch replies for up to 16 ms
            self._serial.set_low_latency_mode(True)
        except (OSError, ValueError, AttributeError):
            pass  # a pty, a CH340 or a UART without the flag
        self._fd = self._serial.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self.ping()
        for k, servo_id in enumerate(self.ids):
            self._setup(k, servo_id)

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None
            self._fd = -1

    def ping(self) -> Any:
        """PING every servo; BusError names the first that does not answer."""
        for servo_id in self.ids:
            self._transact(self.proto.ping_packet(servo_id), servo_id)
        return list(self.ids)

    # ---- hot path --------------------------------------------------------------------------

    def read(self, out: MotorState) -> None:
        if out.q.shape != (self.n,):
            raise ValueError(f"MotorState for {out.q.shape[0]} motors, bus has {self.n}")
        todo = self._everyone
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            try:
                todo = self._sync_read_once(todo)
            except BusError:
                self.stats.errors += 1
                raise
            if not todo:
                break
            if todo[-1] + 1 < self.n:  # the next servo's reply settles a silent one at once
                todo.append(todo[-1] + 1)
        else:
            self.stats.errors += 1
            raise BusError(self._error, self._error_motor)
        out.t_ns = time.monotonic_ns()
        np.subtract(self._pos_raw, self._zero, out=out.q)
        np.multiply(out.q, self._q_per_tick, out=out.q)
        np.multiply(self._vel_raw, self._dq_per_unit, out=out.dq)
        np.multiply(self._eff_raw, self._effort_per_unit, out=out.effort)
        out.temperature_c[:] = self._temp
        out.error_flags.fill(0)
        self.stats.reads += 1
        if True in self._faulty:
            self._raise_fault(out)

    def write(
        self,
        q_target: np.ndarray,
        kp: np.ndarray | None = None,
        kd: np.ndarray | None = None,
        tau_ff: np.ndarray | None = None,
    ) -> None:
        if kp is not None or kd is not None or tau_ff is not None:
            raise CommandError(f"kp/kd/tau_ff are MIT-mode commands; {self.family} runs"
                               " position mode")
        goal = self._goal_f
        np.multiply(q_target, self._tick_per_q, out=goal)
        np.add(goal, self._zero, out=goal)
        np.rint(goal, out=goal)
        np.isfinite(goal, out=self._finite)
        if not self._finite.all() or (goal < self._goal_lo).any() or (goal > self._goal_hi).any():
            k = int(np.argmax(~self._finite | (goal < self._goal_lo) | (goal > self._goal_hi)))
            raise CommandError(
                f"goal for {self._label(k)} = {q_target[k]} rad is not finite or outside the"
                f" servo's position limits [{self._goal_lo[k]:.0f}, {self._goal_hi[k]:.0f}]"
                " ticks", self.joint_names[k])
        self._goal_ticks[:] = goal
        self._seal(self._sync_write)
        try:
            self._send(self._sync_write)
        except BusError:
            self.stats.errors += 1
            raise
        self.stats.writes += 1

    def present_goal(self, out: np.ndarray) -> bool:
        """Goal Position of every servo whose torque is on, else its Present Position.

        One READ of Torque Enable .. Present Position per servo (start-up only): a servo
        holding under load sits off its goal by the position loop's steady-state error:
        commanding the goal read here moves nothing, commanding the measured position would."""
        first = self.addr_torque
        length = self.addr_present + self.position_bytes - first
        on = True
        for k, servo_id in enumerate(self.ids):
            block = self._read_block(servo_id, first, length)
            torque = block[0] == 1
            addr = self.addr_goal if torque else self.addr_present
            ticks = self._position_at(block, addr - first)
            out[k] = (ticks - self._zero[k]) * self._q_per_tick[k]
            on = on and torque
        return on

    def wire_time_us(self) -> float:
        """Bytes of one tick (sync read + n replies + sync write) at 10 bits/byte, plus delays."""
        wire_bytes = len(self._sync_read) + self.n * self._reply_bytes + len(self._sync_write)
        return wire_bytes * 10 / self.baudrate * 1e6 + sum(self.return_delay_us)

    @property
    def request_bytes(self) -> int:
        """Bytes the driver sends per tick: the sync read and the sync write."""
        return len(self._sync_read) + len(self._sync_write)

    def _sync_read_once(self, motors: list[int]) -> list[int]:
        """One SYNC READ of `motors` (indices); fills their raw buffers and returns the servos
        that failed (then self._error says why).

        A corrupt reply fails only its servo, at once: the parser knows each reply's length
        and order (the codec's SyncReplyParser). A retry asks only the failed servos (its
        packet and parser built then: the hot path is the first attempt, for everyone)."""
        if motors is self._everyone:
            packet, parser = self._sync_read, self._replies
        else:
            ids = [self.ids[k] for k in motors]
            packet = self.proto.sync_read_packet(self.read_addr, self.read_len, ids)
            parser = self.proto.SyncReplyParser(ids, self.read_len)
        self._send(packet, flush_input=True)
        rx = self._rx
        parser.reset()
        crc_before = parser.crc_errors
        deadline = time.monotonic_ns() + int(self.timeout_ms * 1e6)
        got = 0
        while not parser.feed(rx, got):
            if got == len(rx):
                self._error, self._error_motor = "sync read: reply overflow", None
                return motors
            remaining_ms = (deadline - time.monotonic_ns()) / 1e6
            if remaining_ms <= 0 or not self._wait_readable(remaining_ms):
                break
            got += self._read_available(got)
        self.last_reply_bytes = got
        self.stats.crc_errors += parser.crc_errors - crc_before
        silent = parser.unsettled()
        if silent:  # the timeout: never heard
            self.stats.timeouts += 1
            self.stats.missing_replies += len(silent)
            for i in silent:
                parser.bad[i] = f"no reply within {self.timeout_ms} ms"
        failed = []
        for i, k in enumerate(motors):  # i: in this request, k: on the bus
            if parser.bad[i] is not None:
                failed.append(k)
                self.stats.per_motor_errors[self.joint_names[k]] += 1
                if i not in silent and parser.bad[i] == self.proto.LOST_REPLY:
                    self.stats.missing_replies += 1
                continue
            error = self._status_error[k] = parser.error[i]
            self._faulty[k] = bool(error & self.fault_mask)
            at = parser.offset[i]
            if at >= 0:
                self._decode(k, rx, at)
            else:  # a stuffed reply, unstuffed by the parser
                self._decode(k, parser.unstuffed[i], 0)
        if failed:
            self._error = "sync read: " + "; ".join(
                f"{parser.bad[motors.index(k)]} from {self._label(k)}" for k in failed)
            self._error_motor = self.joint_names[failed[0]]
        return failed

    def _raise_fault(self, out: MotorState) -> None:
        faults = []
        for k in range(self.n):
            if self._faulty[k]:
                bits = out.error_flags[k] = self._fault_bits(k, self._status_error[k])
                names = ", ".join(self._fault_names(bits)) or "alert without error bits"
                faults.append(f"{self._label(k)}: {names}")
        first = self.joint_names[self._faulty.index(True)]
        raise MotorFault("hardware error: " + "; ".join(faults), first)

    # ---- port I/O --------------------------------------------------------------------------

    def _send(self, packet: bytes | bytearray, flush_input: bool = False) -> None:
        if self._fd < 0:
            raise BusError(f"{self.device} is not open")
        try:
            if flush_input:  # drop late replies of an earlier, failed transaction
                termios.tcflush(self._fd, termios.TCIFLUSH)
            sent = os.write(self._fd, packet)
            while sent < len(packet):
                sent += os.write(self._fd, memoryview(packet)[sent:])
        except (OSError, termios.error) as exc:
            raise BusError(f"{self.device}: device gone ({exc})") from exc

    def _wait_readable(self, timeout_ms: float) -> bool:
        events = self._poller.poll(timeout_ms)
        if events and events[0][1] & _POLL_BAD and not events[0][1] & select.POLLIN:
            raise BusError(f"{self.device}: device gone (hang-up)")
        return bool(events)

    def _read_available(self, offset: int) -> int:
        try:
            count = os.readv(self._fd, [self._rx_view[offset:]])
        except OSError as exc:
            raise BusError(f"{self.device}: device gone ({exc})") from exc
        if count == 0:
            raise BusError(f"{self.device}: device gone (end of file)")
        return count

    # ---- setup transactions (not on the hot path) ------------------------------------------

    def _name_label(self, servo_id: int) -> tuple[str | None, str]:
        k = self._index_by_id.get(servo_id)
        return (None, f"id {servo_id}") if k is None else (self.joint_names[k], self._label(k))

    def _transact(self, packet: bytes, servo_id: int) -> Any:
        """Send an instruction, return the status packet of `servo_id` (retries, then BusError)."""
        name, label = self._name_label(servo_id)
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            self._send(packet, flush_input=True)
            self._parser.clear()
            crc_before = self._parser.crc_errors
            deadline = time.monotonic_ns() + int(self.timeout_ms * 1e6)
            while True:
                reply = next((p for p in self._parser if self._is_answer(p, servo_id)), None)
                if reply is not None:
                    return reply
                remaining_ms = (deadline - time.monotonic_ns()) / 1e6
                if remaining_ms <= 0 or not self._wait_readable(remaining_ms):
                    break
                count = self._read_available(0)
                self._parser.feed(self._rx_view[:count])
            self.stats.crc_errors += self._parser.crc_errors - crc_before
            self.stats.timeouts += 1
            if name:
                self.stats.per_motor_errors[name] += 1
        self.stats.errors += 1
        raise BusError(f"{label}: no valid reply within {self.timeout_ms} ms", name)

    def _read_block(self, servo_id: int, address: int, length: int) -> bytes:
        reply = self._transact(self.proto.read_packet(servo_id, address, length), servo_id)
        if len(reply.params) != length:
            raise BusError(f"id {servo_id}: READ returned {len(reply.params)} of {length} bytes")
        return bytes(reply.params)

    def enable_torque(self, on: bool) -> None:
        """Write Torque Enable to every servo; one that keeps torque off raises MotorFault.

        Turning torque off goes to every servo before any failure is raised (e-stop path)."""
        failures: list[BusError] = []
        for k, servo_id in enumerate(self.ids):
            try:
                error = self.write_register(servo_id, self.addr_torque, 1, int(on))
                if on and self.read_register(servo_id, self.addr_torque, 1) != 1:
                    bits = self._fault_bits(k, error)
                    names = ", ".join(self._fault_names(bits)) or "unknown reason"
                    failures.append(MotorFault(f"{self._label(k)}: torque stays off ({names})",
                                               self.joint_names[k]))
            except BusError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
