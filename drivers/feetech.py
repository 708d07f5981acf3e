"""Feetech STS/SCS motor bus (STS3215 and its kin, position mode) on a half-duplex serial port.

The serial-servo driver (drivers/serial_servo.py) with the FT-SCS codec: a tick's SYNC READ
asks for Present Position, Speed, Load, Voltage and Temperature (addresses 56..63), its SYNC
WRITE sets Goal Position (42). A status error byte with any bit set (voltage, angle sensor,
overheat, overcurrent, overload) raises MotorFault naming the joint, the id and the bits.
EEPROM (Mode, limits) is write-protected by the Lock register; open() unlocks it only to put a
servo in position mode, then locks it again.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from drivers import feetech_protocol as ft
from drivers.bus import BusError
from drivers.serial_servo import SerialServoBus

_SETUP_ADDR = ft.ADDR_MODEL_NUMBER  # one READ covers 3..55: model .. torque, acc, lock
_SETUP_LEN = ft.ADDR_LOCK + 1 - _SETUP_ADDR


class FeetechBus(SerialServoBus):
    """`MotorBus` over Feetech serial-bus servos of one model, in position mode (0)."""

    family = "Feetech"
    proto: ClassVar[ModuleType] = ft
    read_addr = ft.ADDR_PRESENT_POSITION
    read_len = ft.ADDR_PRESENT_TEMPERATURE + 1 - read_addr  # position .. temperature, 8 bytes
    addr_torque = ft.ADDR_TORQUE_ENABLE
    addr_goal = ft.ADDR_GOAL_POSITION
    addr_present = ft.ADDR_PRESENT_POSITION
    position_bytes = 2
    seal_bytes = 1
    fault_mask = 0xFF  # every status error bit is a protection the servo tripped

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
        if model not in ft.MODELS:
            raise ValueError(f"unknown Feetech model {model!r} (known: {', '.join(ft.MODELS)})")
        self.model = ft.MODELS[model]
        series = self.model.series
        self._word = ">H" if series.big_endian else "<H"
        self._unpack_present = struct.Struct(
            (">" if series.big_endian else "<") + "HHHBB").unpack_from
        # Goal Position stays within the servo's limits (0..4095, never negative): its sign
        # bit is never set and the field is a plain unsigned one
        super().__init__(device, baudrate, ids, joint_names, zero_ticks, direction, timeout_ms,
                         retries, return_delay_us, center_ticks=self.model.center_ticks,
                         max_ticks=self.model.max_ticks, ticks_per_rad=self.model.ticks_per_rad,
                         speed_unit=self.model.speed_unit_rad_s,
                         effort_unit=self.model.stall_torque_nm / 1000.0,  # load: 0.1 %
                         goal_dtype=">u2" if series.big_endian else "<u2")
        self.answers_writes = [True] * self.n  # Status Return Level 1; read at open()
        self.voltage_v = np.full(self.n, np.nan)  # Present Voltage of the last read

    @classmethod
    def _config_options(cls, bus_cfg: Any) -> dict[str, Any]:
        return {"model": bus_cfg.model}

    # ---- the family's hooks ----------------------------------------------------------------

    def _setup(self, k: int, servo_id: int) -> None:
        table = self._read_block(servo_id, _SETUP_ADDR, _SETUP_LEN)

        def field(addr: int, size: int = 1) -> int:
            at = addr - _SETUP_ADDR
            return table[at] if size == 1 else int(struct.unpack_from(self._word, table, at)[0])

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

    def _decode(self, k: int, buf: bytes | bytearray, at: int) -> None:
        pos, vel, load, volt, temp = self._unpack_present(buf, at)
        self._pos_raw[k] = self._position(pos)
        self._vel_raw[k] = ft.from_sign_magnitude(vel, ft.SIGN_BIT_SPEED)
        self._eff_raw[k] = ft.from_sign_magnitude(load, ft.SIGN_BIT_LOAD)
        self.voltage_v[k] = volt * 0.1
        self._temp[k] = temp

    def _position(self, raw: int) -> int:
        signed = self.model.series.position_signed
        return ft.from_sign_magnitude(raw, ft.SIGN_BIT_POSITION) if signed else raw

    def _position_at(self, block: bytes, at: int) -> int:
        return self._position(struct.unpack_from(self._word, block, at)[0])

    def _seal(self, packet: bytearray) -> None:
        packet[self._seal_at] = ~sum(memoryview(packet)[2 : self._seal_at]) & 0xFF

    def _is_answer(self, reply: Any, servo_id: int) -> bool:
        # a status whose error byte is set still answers the instruction: the caller decides
        return bool(reply.id == servo_id)

    def _fault_bits(self, k: int, status_error: int) -> int:
        return status_error

    def _fault_names(self, bits: int) -> list[str]:
        return ft.decode_errors(bits)

    # ---- registers -------------------------------------------------------------------------

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
        return int(self._transact(packet, servo_id).code)

    def recover(self, motors: list[str]) -> None:
        """STS/SCS servos have no reboot instruction (0x06 is a factory reset: never): an
        overload or overheat bit clears when its cause is gone, else by a power cycle."""
        raise BusError(f"{', '.join(motors)}: Feetech servos have no reboot instruction; the"
                       " error clears when the load or heat is gone, else power-cycle the"
                       " servo, then duet reset", motors[0] if motors else None)
