"""Dynamixel Protocol 2.0 motor bus (X-series, Position Control mode) on a serial port.

The serial-servo driver (drivers/serial_servo.py) with Protocol 2.0's codec: a tick's SYNC
READ asks for Present Current, Velocity and Position (addresses 126..135), its SYNC WRITE sets
Goal Position (116). A status's alert bit says a hardware error is latched: the driver reads
Hardware Error Status (70) to name it; REBOOT clears it (`recover`).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

from drivers import dynamixel_protocol as dx
from drivers.bus import BusError
from drivers.serial_servo import SerialServoBus

_UNPACK_PRESENT = struct.Struct("<hii").unpack_from
_SETUP_ADDR = dx.ADDR_RETURN_DELAY  # one READ covers 9..68: delay, mode, limits, torque, level
_SETUP_LEN = dx.ADDR_STATUS_RETURN_LEVEL + 1 - _SETUP_ADDR


class DynamixelBus(SerialServoBus):
    """`MotorBus` over Dynamixel X-series servos in Position Control mode (3)."""

    family = "Dynamixel"
    proto: ClassVar[ModuleType] = dx
    read_addr = dx.ADDR_PRESENT_CURRENT
    read_len = 10  # current (2) + velocity (4) + position (4)
    addr_torque = dx.ADDR_TORQUE_ENABLE
    addr_goal = dx.ADDR_GOAL_POSITION
    addr_present = dx.ADDR_PRESENT_POSITION
    position_bytes = 4
    seal_bytes = 2
    fault_mask = dx.ERROR_ALERT

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
        # Goal Position ticks stay in 0..4095 and ids <= 0xFC: the sync write needs no stuffing
        super().__init__(device, baudrate, ids, joint_names, zero_ticks, direction, timeout_ms,
                         retries, return_delay_us, center_ticks=dx.CENTER_TICKS,
                         max_ticks=dx.TICKS_PER_REV - 1, ticks_per_rad=dx.TICKS_PER_RAD,
                         speed_unit=dx.VELOCITY_UNIT_RAD_S,
                         effort_unit=dx.CURRENT_UNIT_A * torque_constant, goal_dtype="<i4")
        self.models: dict[int, int] = {}

    # ---- the family's hooks ----------------------------------------------------------------

    def _setup(self, k: int, servo_id: int) -> None:
        table = self._read_block(servo_id, _SETUP_ADDR, _SETUP_LEN)

        def field(addr: int, fmt: str) -> int:
            return int(struct.unpack_from(fmt, table, addr - _SETUP_ADDR)[0])

        name = self.joint_names[k]
        if field(dx.ADDR_STATUS_RETURN_LEVEL, "<B") != 2:
            raise BusError(f"{name} (id {servo_id}): Status Return Level must be 2", name)
        self.return_delay_us[k] = 2.0 * field(dx.ADDR_RETURN_DELAY, "<B")
        self._goal_lo[k] = field(dx.ADDR_MIN_POSITION_LIMIT, "<i")
        self._goal_hi[k] = field(dx.ADDR_MAX_POSITION_LIMIT, "<i")
        if field(dx.ADDR_OPERATING_MODE, "<B") != dx.OPERATING_MODE_POSITION:
            # Operating Mode is EEPROM: writable only with torque off.
            if field(dx.ADDR_TORQUE_ENABLE, "<B"):
                self.write_register(servo_id, dx.ADDR_TORQUE_ENABLE, 1, 0)
            self.write_register(servo_id, dx.ADDR_OPERATING_MODE, 1, dx.OPERATING_MODE_POSITION)

    def _decode(self, k: int, buf: bytes | bytearray, at: int) -> None:
        self._eff_raw[k], self._vel_raw[k], self._pos_raw[k] = _UNPACK_PRESENT(buf, at)

    def _position_at(self, block: bytes, at: int) -> int:
        return int(struct.unpack_from("<i", block, at)[0])

    def _seal(self, packet: bytearray) -> None:
        at = self._seal_at
        crc = dx.crc16(packet, 0, at)
        packet[at] = crc & 0xFF
        packet[at + 1] = crc >> 8

    def _is_answer(self, reply: Any, servo_id: int) -> bool:
        if not (reply.is_status and reply.id == servo_id):
            return False
        if reply.result:
            name, label = self._name_label(servo_id)
            raise BusError(f"{label}: {dx.RESULT_NAMES.get(reply.result, f'error {reply.result}')}",
                           name)
        return True

    def _fault_bits(self, k: int, status_error: int) -> int:
        return self.read_register(self.ids[k], dx.ADDR_HARDWARE_ERROR_STATUS, 1)

    def _fault_names(self, bits: int) -> list[str]:
        return dx.decode_hardware_error(bits)

    # ---- registers and the family's own instructions ----------------------------------------

    def read_register(self, servo_id: int, address: int, size: int) -> int:
        """Read one 1/2/4-byte register (signed for 2 and 4 bytes, as X-series fields are)."""
        return int.from_bytes(self._read_block(servo_id, address, size), "little",
                              signed=size > 1)

    def write_register(self, servo_id: int, address: int, size: int, value: int) -> int:
        data = value.to_bytes(size, "little", signed=value < 0)
        return int(self._transact(dx.write_packet(servo_id, address, data), servo_id).error)

    def ping(self) -> dict[int, int]:
        """PING every motor; return {id: model number}. BusError names a missing motor."""
        for servo_id in self.ids:
            reply = self._transact(dx.ping_packet(servo_id), servo_id)
            if len(reply.params) != 3:
                raise BusError(f"id {servo_id}: malformed PING reply")
            self.models[servo_id] = reply.params[0] | (reply.params[1] << 8)
        return dict(self.models)

    def reboot(self, servo_id: int) -> None:
        """REBOOT one motor (clears a latched hardware error; torque comes back off)."""
        if servo_id not in self._index_by_id:
            raise ValueError(f"id {servo_id} is not on this bus: {self.ids}")
        self._transact(dx.reboot_packet(servo_id), servo_id)

    def recover(self, motors: list[str], boot_s: float = 2.0) -> None:
        """REBOOT each named servo (the only way to clear a latched Hardware Error Status),
        then wait until it answers a PING again: a servo answers the REBOOT, then boots."""
        for name in motors:
            servo_id = self.ids[self.joint_names.index(name)]
            self.reboot(servo_id)
            deadline = time.monotonic() + boot_s
            while True:
                try:
                    self._transact(dx.ping_packet(servo_id), servo_id)
                    break
                except BusError:
                    if time.monotonic() > deadline:
                        raise
