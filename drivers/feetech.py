"""Feetech STS/SCS motor bus (STS3215 and its kin, position mode) on a half-duplex serial port.

One tick is two transactions: `read()` = one SYNC READ of Present Position, Speed, Load,
Voltage and Temperature (addresses 56..63) for every servo, `write()` = one SYNC WRITE of
Goal Position (42). Both packets are prebuilt at open(); the hot path fills preallocated
byte and numpy buffers in place, talks to the port's file descriptor directly (poll +
readv) and decodes with struct.unpack_from, as drivers/dynamixel.py does. Replies are
resolved servo by servo (feetech_protocol.SyncReplyParser): a corrupt reply fails its servo
at once and keeps the others'.

A status error byte with any bit set (voltage, angle sensor, overheat, overcurrent,
overload) raises MotorFault naming the joint, the id and the bits. EEPROM (Mode, limits) is
write-protected by the Lock register; open() unlocks it only to put a servo in position
mode, then locks it again.
"""

from __future__ import annotations

import os
import select
import struct
import termios
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import serial

from drivers import feetech_protocol as ft
from drivers.bus import BusError, BusStats, CommandError, MotorFault, MotorState

_READ_ADDR = ft.ADDR_PRESENT_POSITION
_READ_LEN = ft.ADDR_PRESENT_TEMPERATURE + 1 - _READ_ADDR  # position .. temperature, 8 bytes
_REPLY_BYTES = ft.STATUS_OVERHEAD + _READ_LEN
_SETUP_ADDR = ft.ADDR_MODEL_NUMBER  # one READ covers 3..55: model .. torque, acc, lock
_SETUP_LEN = ft.ADDR_LOCK + 1 - _SETUP_ADDR
_POLL_BAD = select.POLLHUP | select.POLLERR | select.POLLNVAL


class FeetechBus:
    """`MotorBus` over Feetech serial-bus servos of one model, in position mode (0)."""

    def __init__(
        self,
        device: str,
        baudrate: int,
        ids: Sequence[int],
        joint_names: Sequence[str],
        model: str = "STS3215",
        zero_ticks: Sequence[int] | None = None,
        direction: Sequence[int] | None = None,
        timeout_ms: float = 5.0,
        retries: int = 1,
        return_delay_us: float = 0.0,
    ) -> None:
        n = len(ids)
        if n == 0 or len(joint_names) != n:
            raise ValueError(f"{n} ids for {len(joint_names)} joints")
        if len(set(ids)) != n or not all(0 <= i <= ft.MAX_ID for i in ids):
            raise ValueError(f"ids must be unique and in 0..{ft.MAX_ID}: {list(ids)}")
        if model not in ft.MODELS:
            raise ValueError(f"unknown Feetech model {model!r} (known: {', '.join(ft.MODELS)})")
        self.model = ft.MODELS[model]
        series = self.model.series
        zero = list(zero_ticks) if zero_ticks is not None else [self.model.center_ticks] * n
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
        self.answers_writes = [True] * n  # Status Return Level 1; read at open()
        self.stats = BusStats(per_motor_errors={name: 0 for name in self.joint_names})
        self._index_by_id = {servo_id: k for k, servo_id in enumerate(self.ids)}
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._poller = select.poll()
        self._word = ">H" if series.big_endian else "<H"
        self._unpack_present = struct.Struct(
            (">" if series.big_endian else "<") + "HHHBB").unpack_from

        sign_f = np.array(sign, dtype=float)
        self._zero = np.array(zero, dtype=float)
        self._q_per_tick = sign_f / self.model.ticks_per_rad
        self._tick_per_q = sign_f * self.model.ticks_per_rad
        self._dq_per_unit = sign_f * self.model.speed_unit_rad_s
        self._effort_per_unit = sign_f * self.model.stall_torque_nm / 1000.0  # load: 0.1 %
        self._goal_lo = np.zeros(n)
        self._goal_hi = np.full(n, float(self.model.max_ticks))
        self.voltage_v = np.full(n, np.nan)  # Present Voltage of the last read
        self.last_reply_bytes = 0  # bytes the last sync read took off the line (the bench's)

        self._sync_read = ft.sync_read_packet(_READ_ADDR, _READ_LEN, self.ids)
        self._rx = bytearray(2 * n * _REPLY_BYTES + 64)
        self._rx_view = memoryview(self._rx)
        self._pos_raw = np.zeros(n)
        self._vel_raw = np.zeros(n)
        self._load_raw = np.zeros(n)
        self._temp = np.zeros(n)
        self._errors = [0] * n
        self._replies = ft.SyncReplyParser(self.ids, _READ_LEN)
        self._goal_f = np.zeros(n)
        self._finite = np.zeros(n, dtype=bool)
        # Goal Position stays within the servo's limits (0..4095, never negative), so its
        # sign bit is never set and the field is a plain unsigned view into the packet.
        self._sync_write = bytearray(
            ft.sync_write_packet(ft.ADDR_GOAL_POSITION, 2, {i: bytes(2) for i in self.ids}))
        self._sum_at = len(self._sync_write) - 1
        slot = np.dtype([("id", "u1"), ("goal", ">u2" if series.big_endian else "<u2")])
        self._goal_ticks = np.frombuffer(self._sync_write, dtype=slot, offset=7, count=n)["goal"]
        self._parser = ft.StreamParser()
        self._error = ""
        self._error_motor: str | None = None

    @classmethod
    def from_config(cls, bus_cfg: Any, joint_names: Sequence[str]) -> FeetechBus:
        """Build from a `FeetechBusConfig` (duck-typed: drivers never import runtime)."""
        return cls(
            device=bus_cfg.device,
            baudrate=bus_cfg.baudrate,
            ids=bus_cfg.ids,
            joint_names=joint_names,
            model=bus_cfg.model,
            zero_ticks=bus_cfg.zero_ticks,
            direction=bus_cfg.direction,
            timeout_ms=bus_cfg.timeout_ms,
            retries=bus_cfg.retries,
            return_delay_us=bus_cfg.return_delay_us,
        )

    def _label(self, k: int) -> str:
        return f"{self.joint_names[k]} (id {self.ids[k]})"

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open the port, ping every servo, check its model and setup, select position mode."""
        try:
            self._serial = serial.Serial(self.device, self.baudrate, timeout=0)
        except (serial.SerialException, OSError) as exc:
            raise BusError(f"cannot open {self.device}: {exc}") from exc
        try:  # some adapters otherwise batch replies for milliseconds
            self._serial.set_low_latency_mode(True)
        except (OSError, ValueError, AttributeError):
            pass  # a pty, a CH340 or a UART without the flag
        self._fd = self._serial.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self.ping()
        for k, servo_id in enumerate(self.ids):
            table = self._read_block(servo_id, _SETUP_ADDR, _SETUP_LEN)

            def field(addr: int, size: int = 1, table: bytes = table) -> int:
                at = addr - _SETUP_ADDR
                return table[at] if size == 1 else int(
                    struct.unpack_from(self._word, table, at)[0])

            number = field(ft.ADDR_MODEL_NUMBER, 2)
            if number != self.model.model_number:
                found = ft.MODELS_BY_NUMBER.get(number)
                raise BusError(f"{self._label(k)}: model number {number}"
                               f" ({found.name if found else 'unknown'}), the config says"
                               f" {self.model.name} ({self.model.model_number})",
                               self.joint_names[k])
            self.answers_writes[k] = field(ft.ADDR_STATUS_RETURN_LEVEL) >= 1
            self.return_delay_us[k] = 2.0 * field(ft.ADDR_RETURN_DELAY)
            self._goal_lo[k] = field(ft.ADDR_MIN_POSITION_LIMIT, 2)
            self._goal_hi[k] = field(ft.ADDR_MAX_POSITION_LIMIT, 2)
            if field(ft.ADDR_MODE) != ft.MODE_POSITION:
                self._set_position_mode(servo_id, torque_on=field(ft.ADDR_TORQUE_ENABLE) != 0)
            # no on-board ramp, no speed cap: the follower shapes the motion itself
            self.write_register(servo_id, ft.ADDR_ACCELERATION, 1, 0)
            self.write_register(servo_id, ft.ADDR_GOAL_SPEED, 2, 0)

    def _set_position_mode(self, servo_id: int, torque_on: bool) -> None:
        """Mode is EEPROM: torque off, unlock, write, lock again."""
        lock = self.model.series.lock_addr
        if torque_on:
            self.write_register(servo_id, ft.ADDR_TORQUE_ENABLE, 1, 0)
        self.write_register(servo_id, lock, 1, 0)
        self.write_register(servo_id, ft.ADDR_MODE, 1, ft.MODE_POSITION)
        self.write_register(servo_id, lock, 1, 1)

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None
            self._fd = -1

    # ---- hot path --------------------------------------------------------------------------

    def read(self, out: MotorState) -> None:
        if out.q.shape != (self.n,):
            raise ValueError(f"MotorState for {out.q.shape[0]} motors, bus has {self.n}")
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            try:
                ok = self._sync_read_once()
            except BusError:
                self.stats.errors += 1
                raise
            if ok:
                break
        else:
            self.stats.errors += 1
            raise BusError(self._error, self._error_motor)
        out.t_ns = time.monotonic_ns()
        np.subtract(self._pos_raw, self._zero, out=out.q)
        np.multiply(out.q, self._q_per_tick, out=out.q)
        np.multiply(self._vel_raw, self._dq_per_unit, out=out.dq)
        np.multiply(self._load_raw, self._effort_per_unit, out=out.effort)
        out.temperature_c[:] = self._temp
        self.stats.reads += 1
        out.error_flags[:] = self._errors
        if any(self._errors):
            self._raise_fault()

    def write(
        self,
        q_target: np.ndarray,
        kp: np.ndarray | None = None,
        kd: np.ndarray | None = None,
        tau_ff: np.ndarray | None = None,
    ) -> None:
        if kp is not None or kd is not None or tau_ff is not None:
            raise CommandError("kp/kd/tau_ff are MIT-mode commands; Feetech runs position mode")
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
        packet = self._sync_write
        packet[self._sum_at] = ~sum(memoryview(packet)[2 : self._sum_at]) & 0xFF
        try:
            self._send(packet)
        except BusError:
            self.stats.errors += 1
            raise
        self.stats.writes += 1

    def recover(self, motors: list[str]) -> None:
        """STS/SCS servos have no reboot instruction (0x06 is a factory reset: never): an
        overload or overheat bit clears when its cause is gone, else by a power cycle."""
        raise BusError(f"{', '.join(motors)}: Feetech servos have no reboot instruction; the"
                       " error clears when the load or heat is gone, else power-cycle the"
                       " servo, then duet reset", motors[0] if motors else None)

    def present_goal(self, out: np.ndarray) -> bool:
        """Goal Position of every servo whose torque is on, else its Present Position.

        One READ of Torque Enable .. Present Position (40..57) per servo (start-up only): a
        servo holding under load sits off its goal; commanding the goal read here moves
        nothing, commanding the measured position would."""
        first = ft.ADDR_TORQUE_ENABLE
        length = ft.ADDR_PRESENT_POSITION + 2 - first
        on = True
        for k, servo_id in enumerate(self.ids):
            block = self._read_block(servo_id, first, length)
            torque = block[0] == 1
            addr = ft.ADDR_GOAL_POSITION if torque else ft.ADDR_PRESENT_POSITION
            ticks = self._position(struct.unpack_from(self._word, block, addr - first)[0])
            out[k] = (ticks - self._zero[k]) * self._q_per_tick[k]
            on = on and torque
        return on

    def wire_time_us(self) -> float:
        """Bytes of one tick (sync read + n replies + sync write) at 10 bits/byte, plus delays."""
        wire_bytes = len(self._sync_read) + self.n * _REPLY_BYTES + len(self._sync_write)
        return wire_bytes * 10 / self.baudrate * 1e6 + sum(self.return_delay_us)

    @property
    def request_bytes(self) -> int:
        """Bytes the driver sends per tick: the sync read and the sync write."""
        return len(self._sync_read) + len(self._sync_write)

    def _position(self, raw: int) -> int:
        signed = self.model.series.position_signed
        return ft.from_sign_magnitude(raw, ft.SIGN_BIT_POSITION) if signed else raw

    def _sync_read_once(self) -> bool:
        """One SYNC READ attempt; fills the raw buffers, or sets self._error and returns False."""
        self._send(self._sync_read, flush_input=True)
        rx, parser = self._rx, self._replies
        parser.reset()
        sum_before = parser.checksum_errors
        deadline = time.monotonic_ns() + int(self.timeout_ms * 1e6)
        got = 0
        while not parser.feed(rx, got):
            if got == len(rx):
                self._error, self._error_motor = "sync read: reply overflow", None
                return False
            remaining_ms = (deadline - time.monotonic_ns()) / 1e6
            if remaining_ms <= 0 or not self._wait_readable(remaining_ms):
                break
            got += self._read_available(got)
        self.last_reply_bytes = got
        self.stats.crc_errors += parser.checksum_errors - sum_before
        silent = parser.unsettled()
        if silent:
            self.stats.timeouts += 1
            self.stats.missing_replies += len(silent)
            for k in silent:
                parser.bad[k] = f"no reply within {self.timeout_ms} ms"
        failed = [k for k in range(self.n) if parser.bad[k] is not None]
        if failed:
            for k in failed:
                self.stats.per_motor_errors[self.joint_names[k]] += 1
                if k not in silent and parser.bad[k] == ft.LOST_REPLY:
                    self.stats.missing_replies += 1
            self._error = "sync read: " + "; ".join(
                f"{parser.bad[k]} from {self._label(k)}" for k in failed)
            self._error_motor = self.joint_names[failed[0]]
            return False
        signed = self.model.series.position_signed
        for k in range(self.n):
            pos, vel, load, volt, temp = self._unpack_present(rx, parser.offset[k])
            self._pos_raw[k] = ft.from_sign_magnitude(pos, ft.SIGN_BIT_POSITION) if signed \
                else pos
            self._vel_raw[k] = ft.from_sign_magnitude(vel, ft.SIGN_BIT_SPEED)
            self._load_raw[k] = ft.from_sign_magnitude(load, ft.SIGN_BIT_LOAD)
            self.voltage_v[k] = volt * 0.1
            self._temp[k] = temp
            self._errors[k] = parser.error[k]
        return True

    def _raise_fault(self) -> None:
        faulty = [k for k in range(self.n) if self._errors[k]]
        parts = [f"{self._label(k)}: {', '.join(ft.decode_errors(self._errors[k]))}"
                 for k in faulty]
        raise MotorFault("hardware error: " + "; ".join(parts), self.joint_names[faulty[0]])

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

    def _transact(self, packet: bytes, servo_id: int) -> ft.Packet:
        """Send an instruction, return the status packet of `servo_id` (retries, then BusError).

        A status whose error byte is set still answers the instruction: the caller decides."""
        k = self._index_by_id.get(servo_id)
        name = self.joint_names[k] if k is not None else None
        label = self._label(k) if k is not None else f"id {servo_id}"
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            self._send(packet, flush_input=True)
            self._parser.clear()
            sum_before = self._parser.checksum_errors
            deadline = time.monotonic_ns() + int(self.timeout_ms * 1e6)
            while True:
                reply = next((p for p in self._parser if p.id == servo_id), None)
                if reply is not None:
                    return reply
                remaining_ms = (deadline - time.monotonic_ns()) / 1e6
                if remaining_ms <= 0 or not self._wait_readable(remaining_ms):
                    break
                count = self._read_available(0)
                self._parser.feed(self._rx_view[:count])
            self.stats.crc_errors += self._parser.checksum_errors - sum_before
            self.stats.timeouts += 1
            if name:
                self.stats.per_motor_errors[name] += 1
        self.stats.errors += 1
        raise BusError(f"{label}: no valid reply within {self.timeout_ms} ms", name)

    def _read_block(self, servo_id: int, address: int, length: int) -> bytes:
        reply = self._transact(ft.read_packet(servo_id, address, length), servo_id)
        if len(reply.params) != length:
            raise BusError(f"id {servo_id}: READ returned {len(reply.params)} of {length} bytes")
        return reply.params

    def read_register(self, servo_id: int, address: int, size: int) -> int:
        """Read one 1- or 2-byte register (raw: sign-magnitude fields are the caller's)."""
        block = self._read_block(servo_id, address, size)
        return block[0] if size == 1 else int(struct.unpack_from(self._word, block)[0])

    def write_register(self, servo_id: int, address: int, size: int, value: int) -> int:
        """WRITE one 1- or 2-byte register; returns the status error bits (0 if unanswered)."""
        data = bytes((value,)) if size == 1 else ft.word(value, self.model.series)
        packet = ft.write_packet(servo_id, address, data)
        k = self._index_by_id.get(servo_id)
        if k is not None and not self.answers_writes[k]:
            self._send(packet)
            return 0
        return self._transact(packet, servo_id).code

    def ping(self) -> list[int]:
        """PING every servo; BusError names the first that does not answer."""
        for servo_id in self.ids:
            self._transact(ft.ping_packet(servo_id), servo_id)
        return list(self.ids)

    def enable_torque(self, on: bool) -> None:
        """Write Torque Enable to every servo; one that keeps torque off raises MotorFault.

        Turning torque off goes to every servo before any failure is raised (e-stop path)."""
        failures: list[BusError] = []
        for k, servo_id in enumerate(self.ids):
            try:
                error = self.write_register(servo_id, ft.ADDR_TORQUE_ENABLE, 1, int(on))
                if on and self.read_register(servo_id, ft.ADDR_TORQUE_ENABLE, 1) != 1:
                    names = ", ".join(ft.decode_errors(error)) or "unknown reason"
                    failures.append(MotorFault(f"{self._label(k)}: torque stays off ({names})",
                                               self.joint_names[k]))
            except BusError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
