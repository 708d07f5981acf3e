"""Emulated Feetech STS/SCS servos (STS3215 by default) behind a pseudo-terminal.

The serving thread (sim/pty_server.py) hands this emulator the bytes that arrive; it answers
like the real servos (PING, READ, WRITE, REG_WRITE + ACTION, SYNC READ, SYNC WRITE; Status
Return Level; the EEPROM Lock; the status error byte from the latched faults, and torque off
for the ones in Unloading Condition) and maps the memory table onto the shared `Actuators`
that the physics integrates.

Gain map (documented, linear, not measured on a servo: Feetech does not publish the
controller's scaling). The physics applies tau = kp*(goal_q - q) - kd*dq, saturated. The P
coefficient (register 21) is taken as the share of stall torque per tick of error, in 0.1 %
(torque fraction = P * e_ticks / 1000: P=32 saturates at 31 ticks, 2.7°), the D coefficient
(22) the same per tick/ms of speed, plus the damping of back-EMF:

    kp [N·m/rad]   = P/1000 * TICKS_PER_RAD * STALL_TORQUE             (STS3215, P=32: 39.8)
    kd [N·m·s/rad] = BACK_EMF_DAMPING + D/1000 * TICKS_PER_RAD * STALL_TORQUE * 1e-3
    BACK_EMF_DAMPING = stall torque / no-load speed                     (STS3215: 0.41)

Present Load is the applied torque in 0.1 % of the stall torque (sign bit 10), Present
Current the same share of the stall current. The emulator answers at once: Return Delay Time
is 0 (a configured arm) and is not simulated.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from drivers import feetech_protocol as ft
from sim.actuators import (
    HW_ELECTRICAL_SHOCK,
    HW_ENCODER,
    HW_INPUT_VOLTAGE,
    HW_OVERHEATING,
    HW_OVERLOAD,
    Actuators,
)
from sim.serial_servo_emulator import Reply, SerialServoEmulator

# the sim's latched fault bits (Dynamixel's layout, sim/actuators.py) -> the status error byte
_ERROR_BITS = ((HW_INPUT_VOLTAGE, ft.ERR_VOLTAGE), (HW_ENCODER, ft.ERR_ANGLE),
               (HW_OVERHEATING, ft.ERR_OVERHEAT), (HW_ELECTRICAL_SHOCK, ft.ERR_OVERCURRENT),
               (HW_OVERLOAD, ft.ERR_OVERLOAD))
STALL_CURRENT_A = {"STS3215": 2.7, "STS3250": 4.0, "SCS0009": 0.6}
CURRENT_UNIT_A = 6.5e-3
NOMINAL_VOLTAGE_DV = {"STS3215": 74, "STS3250": 120, "SCS0009": 50}  # 0.1 V
MOVING_TICKS_S = 20  # |speed| above this reads Moving = 1
FIRMWARE = (3, 10)


def position_gains_si(p_coef: int, d_coef: int, model: ft.ServoModel) -> tuple[float, float]:
    """(kp, kd) in SI units from the P/D coefficient registers (module docstring)."""
    per_unit = model.ticks_per_rad * model.stall_torque_nm / 1000
    back_emf = model.stall_torque_nm / (model.no_load_rpm * 2 * np.pi / 60)
    return p_coef * per_unit, back_emf + d_coef * per_unit * 1e-3


def default_table(servo_id: int, model: ft.ServoModel) -> bytearray:
    """The memory table of a servo out of the box (ids and limits as on an SO-101)."""
    t = bytearray(ft.MEMORY_SIZE)
    w = model.series

    def put2(addr: int, value: int) -> None:
        t[addr : addr + 2] = ft.word(value, w)

    t[ft.ADDR_FIRMWARE_MAJOR], t[ft.ADDR_FIRMWARE_MINOR] = FIRMWARE
    put2(ft.ADDR_MODEL_NUMBER, model.model_number)
    t[ft.ADDR_ID] = servo_id
    t[ft.ADDR_BAUD_RATE] = 0  # 1 Mbit/s
    t[ft.ADDR_RETURN_DELAY] = 0
    t[ft.ADDR_STATUS_RETURN_LEVEL] = 1
    put2(ft.ADDR_MIN_POSITION_LIMIT, 0)
    put2(ft.ADDR_MAX_POSITION_LIMIT, model.max_ticks)
    t[ft.ADDR_MAX_TEMPERATURE] = 70
    t[ft.ADDR_MAX_VOLTAGE] = 140
    t[ft.ADDR_MIN_VOLTAGE] = 40
    put2(ft.ADDR_MAX_TORQUE, 1000)
    t[ft.ADDR_UNLOADING_CONDITION] = ft.ERR_OVERHEAT | ft.ERR_OVERCURRENT | ft.ERR_OVERLOAD
    t[ft.ADDR_LED_ALARM_CONDITION] = t[ft.ADDR_UNLOADING_CONDITION] | ft.ERR_VOLTAGE
    t[ft.ADDR_P_COEFFICIENT], t[ft.ADDR_D_COEFFICIENT] = 32, 32
    t[ft.ADDR_MODE] = ft.MODE_POSITION
    put2(ft.ADDR_TORQUE_LIMIT, 1000)
    t[model.series.lock_addr] = 1
    t[ft.ADDR_PRESENT_VOLTAGE] = NOMINAL_VOLTAGE_DV.get(model.name, 74)
    return t


class FeetechEmulator(SerialServoEmulator):
    """Feetech servos with ids `ids` of one model, joint i of `actuators` behind servo ids[i]."""

    proto: ClassVar[ModuleType] = ft
    table_size = ft.MEMORY_SIZE
    addr_id = ft.ADDR_ID
    addr_torque = ft.ADDR_TORQUE_ENABLE
    thread_name = "feetech-emulator"

    def __init__(
        self,
        actuators: Actuators,
        ids: Sequence[int],
        model: ft.ServoModel = ft.STS3215,
        zero_ticks: Sequence[int] | None = None,
        direction: Sequence[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.series = model.series
        super().__init__(actuators, ids, zero_ticks, direction, seed, model.center_ticks,
                         model.ticks_per_rad)
        self._registered: list[tuple[int, bytes] | None] = [None] * len(ids)  # until ACTION

    @classmethod
    def from_config(cls, actuators: Actuators, bus: Any) -> FeetechEmulator:
        """The servos a `FeetechBusConfig` names (duck-typed), on the sim's actuators."""
        return cls(actuators, bus.ids, ft.MODELS[bus.model], zero_ticks=bus.zero_ticks,
                   direction=bus.direction)

    def _default_table(self, k: int, servo_id: int) -> bytearray:
        return default_table(servo_id, self.model)

    # ---- instruction handling ----------------------------------------------------------------

    def _instruction(self, packet: ft.Packet) -> tuple[int, bytes]:
        return packet.code, packet.params

    def _head(self, params: bytes) -> tuple[int, int, bytes] | None:
        return (params[0], params[1], params[2:]) if len(params) >= 2 else None

    def _answers(self, k: int, instr: int) -> bool:
        return instr in (ft.PING, ft.READ) or self.tables[k][ft.ADDR_STATUS_RETURN_LEVEL] >= 1

    def _unicast(self, k: int, instr: int, params: bytes) -> Reply | None:
        if instr == ft.PING:
            return 0, b""
        if instr == ft.READ:
            if len(params) != 2 or not self._in_table(params[0], params[1]):
                return None  # outside the table: the servo stays silent
            addr, length = params
            self._refresh_present((k,))
            return 0, bytes(self.tables[k][addr : addr + length])
        if instr in (ft.WRITE, ft.REG_WRITE):
            if len(params) < 2:
                return None
            if instr == ft.WRITE:
                self._write(k, params[0], params[1:])
            else:
                self._registered[k] = (params[0], params[1:])
            return 0, b""
        if instr == ft.ACTION:
            staged, self._registered[k] = self._registered[k], None
            if staged is not None:
                self._write(k, *staged)
            return 0, b""
        return None

    def _error_byte(self, k: int) -> int:
        hw = int(self.actuators.hw_error[k])
        return sum(bit for sim_bit, bit in _ERROR_BITS if hw & sim_bit)

    def _status_error(self, k: int, error: int) -> int:
        # the protocol has no result codes: the status carries the latched faults alone
        error = self.tables[k][ft.ADDR_STATUS] = self._error_byte(k)
        return error

    def _write(self, k: int, addr: int, data: bytes) -> None:
        """WRITE as the servo does it: read-only bytes and a locked EEPROM refuse the write
        (the status carries no access error: the protocol has none), Goal Position is held to
        the angle limits, Torque Enable stays off while an unloading fault is latched."""
        table = self.tables[k]
        end = addr + len(data)
        if end > ft.MEMORY_SIZE or addr < ft.ADDR_ID or end - 1 >= ft.ADDR_PRESENT_POSITION:
            return
        locked = table[self.series.lock_addr] != 0
        if addr < ft.EEPROM_END and locked and not (addr <= self.series.lock_addr < end):
            return
        table[addr:end] = data
        goal = addr <= ft.ADDR_GOAL_POSITION + 1 and end > ft.ADDR_GOAL_POSITION
        if goal:  # held to the angle limits, as the servo does
            lo = ft.unword(table, ft.ADDR_MIN_POSITION_LIMIT, self.series)
            hi = ft.unword(table, ft.ADDR_MAX_POSITION_LIMIT, self.series)
            self._put_goal(k, min(max(self._goal_ticks(k), lo), hi))
        self._apply_written(
            k, goal=goal, renumbered=addr <= ft.ADDR_ID < end,
            torque=addr <= ft.ADDR_TORQUE_ENABLE < end,
            gains=addr <= ft.ADDR_D_COEFFICIENT and end > ft.ADDR_P_COEFFICIENT)

    # ---- memory table <-> physics (callers hold actuators.lock where noted) ----------------

    def _unloaded(self, k: int) -> bool:
        return bool(self._error_byte(k) & self.tables[k][ft.ADDR_UNLOADING_CONDITION])

    def _cuts_torque(self, k: int) -> bool:
        return bool(self.actuators.torque_enabled[k]) and self._unloaded(k)

    def _holds_torque_off(self, k: int) -> bool:
        return self._unloaded(k)

    def _encode_position(self, ticks: int) -> bytes:
        ticks = max(-32767, min(32767, ticks))  # limits written by a client may be anything
        raw = ft.to_sign_magnitude(ticks, ft.SIGN_BIT_POSITION) if self.series.position_signed \
            else max(0, ticks)
        return ft.word(raw, self.series)

    def _put_goal(self, k: int, ticks: int) -> None:
        self.tables[k][ft.ADDR_GOAL_POSITION : ft.ADDR_GOAL_POSITION + 2] = \
            self._encode_position(ticks)

    def _goal_ticks(self, k: int) -> int:
        raw = ft.unword(self.tables[k], ft.ADDR_GOAL_POSITION, self.series)
        return ft.from_sign_magnitude(raw, ft.SIGN_BIT_POSITION) if self.series.position_signed \
            else raw

    def _apply_gains(self, k: int) -> None:  # lock held
        t = self.tables[k]
        self.actuators.kp[k], self.actuators.kd[k] = position_gains_si(
            t[ft.ADDR_P_COEFFICIENT], t[ft.ADDR_D_COEFFICIENT], self.model)

    def _put_present(self, k: int, q: float, dq: float, tau: float, temperature: float) -> None:
        model, series = self.model, self.series
        table, sign = self.tables[k], self.direction[k]
        ticks = round(self.zero_ticks[k] + sign * q * model.ticks_per_rad)
        speed = round(sign * dq * model.ticks_per_rad)
        share = max(-1.0, min(1.0, sign * tau / model.stall_torque_nm))
        speed = max(-32767, min(32767, speed))
        table[ft.ADDR_PRESENT_POSITION : ft.ADDR_PRESENT_POSITION + 2] = \
            self._encode_position(ticks)
        table[ft.ADDR_PRESENT_SPEED : ft.ADDR_PRESENT_SPEED + 2] = ft.word(
            ft.to_sign_magnitude(speed, ft.SIGN_BIT_SPEED), series)
        table[ft.ADDR_PRESENT_LOAD : ft.ADDR_PRESENT_LOAD + 2] = ft.word(
            ft.to_sign_magnitude(round(share * 1000), ft.SIGN_BIT_LOAD), series)
        table[ft.ADDR_PRESENT_TEMPERATURE] = max(0, min(255, round(temperature)))
        table[ft.ADDR_MOVING] = int(abs(speed) > MOVING_TICKS_S)
        current = round(abs(share) * STALL_CURRENT_A.get(model.name, 2.7) / CURRENT_UNIT_A)
        table[ft.ADDR_PRESENT_CURRENT : ft.ADDR_PRESENT_CURRENT + 2] = ft.word(
            ft.to_sign_magnitude(current if share >= 0 else -current, ft.SIGN_BIT_CURRENT),
            series)
        table[ft.ADDR_STATUS] = self._error_byte(k)
