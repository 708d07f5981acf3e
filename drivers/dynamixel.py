"""Dynamixel Protocol 2.0 motor bus (X-series, Position Control mode) on a serial port.

One tick is two transactions: `read()` = one SYNC READ of Present Current, Velocity and
Position (addresses 126..135) for every motor, `write()` = one SYNC WRITE of Goal Position.
A read that fails for some motors (a corrupt or lost reply) keeps the other motors' replies
and retries a SYNC READ of the failed ones only (and the motor after them, whose reply settles
a silent one without waiting out the timeout: servos answer in request order).
Both packets are prebuilt at open(); the hot path fills preallocated byte and numpy buffers in
place, talks to the port's file descriptor directly (poll + readv), and parses replies with
struct.unpack_from, so it allocates no buffers per call.
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

from drivers import dynamixel_protocol as dx
from drivers.bus import BusError, BusStats, CommandError, MotorFault, MotorState

_READ_ADDR = dx.ADDR_PRESENT_CURRENT
_READ_LEN = 10  # current (2) + velocity (4) + position (4)
_REPLY_BYTES = dx.STATUS_OVERHEAD + _READ_LEN
_UNPACK_PRESENT = struct.Struct("<hii").unpack_from
_SETUP_ADDR = dx.ADDR_RETURN_DELAY  # one READ covers 9..68: delay, mode, limits, torque, level
_SETUP_LEN = dx.ADDR_STATUS_RETURN_LEVEL + 1 - _SETUP_ADDR
_POLL_BAD = select.POLLHUP | select.POLLERR | select.POLLNVAL


class DynamixelBus:
    """`MotorBus` over Dynamixel X-series servos in Position Control mode (3)."""

    def __init__(
        self,
        device: str,
        baudrate: int,
        ids: Sequence[int],
        joint_names: Sequence[str],
        zero_ticks: Sequence[int] | None = None,
        direction: Sequence[int] | None = None,
        timeout_ms: float = 5.0,
        retries: int = 1,
        return_delay_us: float = 0.0,
        torque_constant: float = dx.XM430_TORQUE_CONSTANT_NM_PER_A,
    ) -> None:
        n = len(ids)
        if n == 0 or len(joint_names) != n:
            raise ValueError(f"{n} ids for {len(joint_names)} joints")
        if len(set(ids)) != n or not all(0 <= i <= dx.MAX_ID for i in ids):
            raise ValueError(f"ids must be unique and in 0..{dx.MAX_ID}: {list(ids)}")
        zero = list(zero_ticks) if zero_ticks is not None else [dx.CENTER_TICKS] * n
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
        self.models: dict[int, int] = {}
        self._index_by_id = {dxl_id: k for k, dxl_id in enumerate(self.ids)}
        self._serial: serial.Serial | None = None
        self._fd = -1
        self._poller = select.poll()

        # unit conversions, per joint
        sign_f = np.array(sign, dtype=float)
        self._zero = np.array(zero, dtype=float)
        self._q_per_tick = sign_f / dx.TICKS_PER_RAD
        self._tick_per_q = sign_f * dx.TICKS_PER_RAD
        self._dq_per_unit = sign_f * dx.VELOCITY_UNIT_RAD_S
        self._effort_per_unit = sign_f * dx.CURRENT_UNIT_A * torque_constant
        self._goal_lo = np.zeros(n)
        self._goal_hi = np.full(n, dx.TICKS_PER_REV - 1.0)

        # hot-path buffers
        self._sync_read = dx.sync_read_packet(_READ_ADDR, _READ_LEN, self.ids)
        self._rx = bytearray(4 * n * _REPLY_BYTES + 64)  # room for stuffing and stray bytes
        self._rx_view = memoryview(self._rx)
        self._cur_raw = np.zeros(n)
        self._vel_raw = np.zeros(n)
        self._pos_raw = np.zeros(n)
        self._replies = dx.SyncReplyParser(self.ids, _READ_LEN)
        self._everyone = list(range(n))
        self._alert = [False] * n
        self._goal_f = np.zeros(n)
        self._finite = np.zeros(n, dtype=bool)
        # Goal Position ticks stay in 0..4095 and ids <= 0xFC, so this packet never needs
        # stuffing: its layout is fixed and the tick fields are a numpy view into it.
        self._sync_write = bytearray(
            dx.sync_write_packet(dx.ADDR_GOAL_POSITION, 4, {i: bytes(4) for i in self.ids})
        )
        self._crc_at = len(self._sync_write) - 2
        slot = np.dtype([("id", "u1"), ("goal", "<i4")])
        self._goal_ticks = np.frombuffer(self._sync_write, dtype=slot, offset=12, count=n)["goal"]
        self._parser = dx.StreamParser()
        self._error = ""
        self._error_motor: str | None = None

    @classmethod
    def from_config(cls, bus_cfg: Any, joint_names: Sequence[str]) -> DynamixelBus:
        """Build from a `DynamixelBusConfig` (duck-typed: drivers never import runtime)."""
        return cls(
            device=bus_cfg.device,
            baudrate=bus_cfg.baudrate,
            ids=bus_cfg.ids,
            joint_names=joint_names,
            zero_ticks=bus_cfg.zero_ticks,
            direction=bus_cfg.direction,
            timeout_ms=bus_cfg.timeout_ms,
            retries=bus_cfg.retries,
            return_delay_us=bus_cfg.return_delay_us,
        )

    # ---- lifecycle -------------------------------------------------------------------------

    def open(self) -> None:
        """Open the port, ping every motor, check its setup, select Position Control mode."""
        try:
            self._serial = serial.Serial(self.device, self.baudrate, timeout=0)
        except (serial.SerialException, OSError) as exc:
            raise BusError(f"cannot open {self.device}: {exc}") from exc
        try:  # USB adapters (FTDI) otherwise batch replies for up to 16 ms
            self._serial.set_low_latency_mode(True)
        except (OSError, ValueError, AttributeError):
            pass  # a pty or a UART without the flag
        self._fd = self._serial.fileno()
        self._poller = select.poll()
        self._poller.register(self._fd, select.POLLIN)
        self.ping()
        for k, dxl_id in enumerate(self.ids):
            table = self._read_block(dxl_id, _SETUP_ADDR, _SETUP_LEN)

            def field(addr: int, fmt: str, table: bytes = table) -> int:
                return int(struct.unpack_from(fmt, table, addr - _SETUP_ADDR)[0])

            name = self.joint_names[k]
            if field(dx.ADDR_STATUS_RETURN_LEVEL, "<B") != 2:
                raise BusError(f"{name} (id {dxl_id}): Status Return Level must be 2", name)
            self.return_delay_us[k] = 2.0 * field(dx.ADDR_RETURN_DELAY, "<B")
            self._goal_lo[k] = field(dx.ADDR_MIN_POSITION_LIMIT, "<i")
            self._goal_hi[k] = field(dx.ADDR_MAX_POSITION_LIMIT, "<i")
            if field(dx.ADDR_OPERATING_MODE, "<B") != dx.OPERATING_MODE_POSITION:
                # Operating Mode is EEPROM: writable only with torque off.
                if field(dx.ADDR_TORQUE_ENABLE, "<B"):
                    self.write_register(dxl_id, dx.ADDR_TORQUE_ENABLE, 1, 0)
                self.write_register(dxl_id, dx.ADDR_OPERATING_MODE, 1, dx.OPERATING_MODE_POSITION)

    def close(self) -> None:
        if self._serial is not None:
            self._serial.close()
            self._serial = None
            self._fd = -1

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
            if todo[-1] + 1 < self.n:  # the next motor's reply settles a silent one at once
                todo.append(todo[-1] + 1)
        else:
            self.stats.errors += 1
            raise BusError(self._error, self._error_motor)
        out.t_ns = time.monotonic_ns()
        np.subtract(self._pos_raw, self._zero, out=out.q)
        np.multiply(out.q, self._q_per_tick, out=out.q)
        np.multiply(self._vel_raw, self._dq_per_unit, out=out.dq)
        np.multiply(self._cur_raw, self._effort_per_unit, out=out.effort)
        out.error_flags.fill(0)
        self.stats.reads += 1
        if True in self._alert:
            self._raise_hardware_fault(out)

    def write(
        self,
        q_target: np.ndarray,
        kp: np.ndarray | None = None,
        kd: np.ndarray | None = None,
        tau_ff: np.ndarray | None = None,
    ) -> None:
        if kp is not None or kd is not None or tau_ff is not None:
            raise CommandError("kp/kd/tau_ff are MIT-mode commands; Dynamixel runs Position mode")
        goal = self._goal_f
        np.multiply(q_target, self._tick_per_q, out=goal)
        np.add(goal, self._zero, out=goal)
        np.rint(goal, out=goal)
        np.isfinite(goal, out=self._finite)
        if not self._finite.all() or (goal < self._goal_lo).any() or (goal > self._goal_hi).any():
            k = int(np.argmax(~self._finite | (goal < self._goal_lo) | (goal > self._goal_hi)))
            raise CommandError(
                f"goal for {self.joint_names[k]} (id {self.ids[k]}) = {q_target[k]} rad is not"
                f" finite or outside the servo's position limits [{self._goal_lo[k]:.0f},"
                f" {self._goal_hi[k]:.0f}] ticks", self.joint_names[k])
        self._goal_ticks[:] = goal
        packet = self._sync_write
        crc = dx.crc16(packet, 0, self._crc_at)
        packet[self._crc_at] = crc & 0xFF
        packet[self._crc_at + 1] = crc >> 8
        try:
            self._send(packet)
        except BusError:
            self.stats.errors += 1
            raise
        self.stats.writes += 1

    def present_goal(self, out: np.ndarray) -> bool:
        """Goal Position of every servo whose torque is on, else its Present Position.

        One READ of Torque Enable .. Present Position (64..135) per servo (start-up only). A
        servo holding under load sits off its goal by the position loop's steady-state error:
        commanding the goal read here moves nothing, commanding the measured position would.
        """
        first = dx.ADDR_TORQUE_ENABLE
        length = dx.ADDR_PRESENT_POSITION + 4 - first
        on = True
        for k, dxl_id in enumerate(self.ids):
            block = self._read_block(dxl_id, first, length)
            torque = block[0] == 1
            addr = dx.ADDR_GOAL_POSITION if torque else dx.ADDR_PRESENT_POSITION
            (ticks,) = struct.unpack_from("<i", block, addr - first)
            out[k] = (ticks - self._zero[k]) * self._q_per_tick[k]
            on = on and torque
        return on

    def wire_time_us(self) -> float:
        """Bytes of one tick (sync read + n replies + sync write) at 10 bits/byte, plus delays."""
        wire_bytes = len(self._sync_read) + self.n * _REPLY_BYTES + len(self._sync_write)
        return wire_bytes * 10 / self.baudrate * 1e6 + sum(self.return_delay_us)

    def _sync_read_once(self, motors: list[int]) -> list[int]:
        """One SYNC READ of `motors` (indices); fills their raw buffers and returns the motors
        that failed (then self._error says why).

        A corrupt reply fails only its motor, at once: the parser knows each reply's length
        and order (dynamixel_protocol.SyncReplyParser). A retry asks only the failed motors
        (its packet and parser built then: the hot path is the first attempt, for everyone)."""
        if motors is self._everyone:
            packet, parser = self._sync_read, self._replies
        else:
            ids = [self.ids[k] for k in motors]
            packet = dx.sync_read_packet(_READ_ADDR, _READ_LEN, ids)
            parser = dx.SyncReplyParser(ids, _READ_LEN)
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
                if i not in silent and parser.bad[i] == dx.LOST_REPLY:
                    self.stats.missing_replies += 1
                continue
            self._alert[k] = bool(parser.error[i] & dx.ERROR_ALERT)
            at = parser.offset[i]
            cur, vel, ticks = (_UNPACK_PRESENT(rx, at) if at >= 0
                               else _UNPACK_PRESENT(parser.unstuffed[i]))
            self._cur_raw[k] = cur
            self._vel_raw[k] = vel
            self._pos_raw[k] = ticks
        if failed:
            self._error = "sync read: " + "; ".join(
                f"{parser.bad[motors.index(k)]} from {self.joint_names[k]} (id {self.ids[k]})"
                for k in failed)
            self._error_motor = self.joint_names[failed[0]]
        return failed

    def _raise_hardware_fault(self, out: MotorState) -> None:
        faults = []
        for k in range(self.n):
            if self._alert[k]:
                bits = self.read_register(self.ids[k], dx.ADDR_HARDWARE_ERROR_STATUS, 1)
                out.error_flags[k] = bits
                names = ", ".join(dx.decode_hardware_error(bits)) or "alert without error bits"
                faults.append((self.joint_names[k], f"{self.joint_names[k]}: {names}"))
        raise MotorFault("hardware error: " + "; ".join(f for _, f in faults), faults[0][0])

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

    def _transact(self, packet: bytes, dxl_id: int) -> dx.Packet:
        """Send an instruction, return the status packet of `dxl_id` (retries, then BusError)."""
        name = self.joint_names[self._index_by_id[dxl_id]] if dxl_id in self._index_by_id else None
        label = f"{name} (id {dxl_id})" if name else f"id {dxl_id}"
        for attempt in range(self.retries + 1):
            if attempt:
                self.stats.retries += 1
            self._send(packet, flush_input=True)
            self._parser.clear()
            crc_before = self._parser.crc_errors
            deadline = time.monotonic_ns() + int(self.timeout_ms * 1e6)
            while True:
                reply = next((p for p in self._parser if p.is_status and p.id == dxl_id), None)
                if reply is not None:
                    if reply.result:
                        reason = dx.RESULT_NAMES.get(reply.result, f"error {reply.result}")
                        raise BusError(f"{label}: {reason}", name)
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

    def _read_block(self, dxl_id: int, address: int, length: int) -> bytes:
        reply = self._transact(dx.read_packet(dxl_id, address, length), dxl_id)
        if len(reply.params) != length:
            raise BusError(f"id {dxl_id}: READ returned {len(reply.params)} of {length} bytes")
        return reply.params

    def read_register(self, dxl_id: int, address: int, size: int) -> int:
        """Read one 1/2/4-byte register (signed for 2 and 4 bytes, as X-series fields are)."""
        return int.from_bytes(self._read_block(dxl_id, address, size), "little", signed=size > 1)

    def write_register(self, dxl_id: int, address: int, size: int, value: int) -> None:
        data = value.to_bytes(size, "little", signed=value < 0)
        self._transact(dx.write_packet(dxl_id, address, data), dxl_id)

    def ping(self) -> dict[int, int]:
        """PING every motor; return {id: model number}. BusError names a missing motor."""
        for dxl_id in self.ids:
            reply = self._transact(dx.ping_packet(dxl_id), dxl_id)
            if len(reply.params) != 3:
                raise BusError(f"id {dxl_id}: malformed PING reply")
            self.models[dxl_id] = reply.params[0] | (reply.params[1] << 8)
        return dict(self.models)

    def reboot(self, dxl_id: int) -> None:
        """REBOOT one motor (clears a latched hardware error; torque comes back off)."""
        if dxl_id not in self._index_by_id:
            raise ValueError(f"id {dxl_id} is not on this bus: {self.ids}")
        self._transact(dx.reboot_packet(dxl_id), dxl_id)

    def recover(self, motors: list[str], boot_s: float = 2.0) -> None:
        """REBOOT each named servo (the only way to clear a latched Hardware Error Status),
        then wait until it answers a PING again: a servo answers the REBOOT, then boots."""
        for name in motors:
            dxl_id = self.ids[self.joint_names.index(name)]
            self.reboot(dxl_id)
            deadline = time.monotonic() + boot_s
            while True:
                try:
                    self._transact(dx.ping_packet(dxl_id), dxl_id)
                    break
                except BusError:
                    if time.monotonic() > deadline:
                        raise

    def enable_torque(self, on: bool) -> None:
        """Write Torque Enable to every motor; a motor that keeps torque off raises MotorFault.

        Turning torque off goes to every motor before any failure is raised (e-stop path).
        """
        failures: list[BusError] = []
        for k, dxl_id in enumerate(self.ids):
            try:
                self.write_register(dxl_id, dx.ADDR_TORQUE_ENABLE, 1, int(on))
                if on and self.read_register(dxl_id, dx.ADDR_TORQUE_ENABLE, 1) != 1:
                    bits = self.read_register(dxl_id, dx.ADDR_HARDWARE_ERROR_STATUS, 1)
                    names = ", ".join(dx.decode_hardware_error(bits)) or "unknown reason"
                    name = self.joint_names[k]
                    failures.append(MotorFault(f"{name}: torque stays off ({names})", name))
            except BusError as exc:
                failures.append(exc)
        if failures:
            raise failures[0]
