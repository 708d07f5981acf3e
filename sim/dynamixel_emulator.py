"""Emulated Dynamixel X-series servos (XM430-W350) behind a pseudo-terminal.

A serving thread reads instruction packets from the pty master, answers like the real servos
(PING, READ, WRITE, REBOOT, SYNC READ, SYNC WRITE, BULK READ; status return level; EEPROM lock while
torque is on; alert bit while Hardware Error Status != 0) and maps the control table onto
the shared `Actuators` arrays that the physics loop integrates.

Gain map (documented, linear; the physics applies tau = kp*(goal_q - q) - kd*dq, saturated):
the servo's controller outputs PWM = KPP*e_ticks + KPD*de_ticks/ms with KPP = P/128 and
KPD = D/16 (e-manual), and full PWM (885) on a stalled XM430-W350 at 12 V gives its stall
torque, 4.1 N·m. So

    kp [N·m/rad]   = P/128 * TICKS_PER_RAD * STALL_TORQUE/885            (P=800 -> 18.9)
    kd [N·m·s/rad] = BACK_EMF_DAMPING + D/16 * TICKS_PER_RAD * STALL_TORQUE/885 * 1e-3
    (stall torque and no-load speed per servo model, `ServoModel`)

where BACK_EMF_DAMPING = stall torque / no-load speed (XM430-W350: 4.1 N·m / 46 rpm = 0.85;
XM540-W270: 10.6 N·m / 30 rpm = 3.37) is the damping
every voltage-driven DC motor has. With the defaults (P=800, D=0) that is a stiff loop with
damping from back-EMF alone, as on the real servo. The Position I gain is not modelled.
The emulator answers immediately: Return Delay Time is initialised to 0 (a bus tuned for
4 Mbps) and is not simulated.
"""

from __future__ import annotations

import math
import multiprocessing
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from types import ModuleType
from typing import Any, ClassVar

from drivers import dynamixel_protocol as dx
from drivers.dynamixel_protocol import (
    CENTER_TICKS,
    CURRENT_UNIT_A,
    TICKS_PER_RAD,
    TICKS_PER_REV,
    VELOCITY_UNIT_RAD_S,
)
from drivers.dynamixel_protocol import XM430_TORQUE_CONSTANT_NM_PER_A as TORQUE_CONSTANT_NM_PER_A
from sim.actuators import Actuators
from sim.serial_servo_emulator import Reply, SerialServoEmulator

PWM_LIMIT = 885


@dataclass(frozen=True)
class ServoModel:
    """What the position loop needs of a servo model (12 V figures from the e-manual)."""

    name: str
    model_number: int
    stall_torque_nm: float
    no_load_rpm: float

    @property
    def torque_per_pwm(self) -> float:
        return self.stall_torque_nm / PWM_LIMIT

    @property
    def back_emf_damping(self) -> float:
        return self.stall_torque_nm / (self.no_load_rpm * 2 * math.pi / 60)


XM430_W350 = ServoModel("XM430-W350", 1020, 4.1, 46.0)
XM540_W270 = ServoModel("XM540-W270", 1120, 10.6, 30.0)
SERVO_MODELS = {m.name: m for m in (XM430_W350, XM540_W270)}
FIRMWARE_VERSION = 48

# Access class of each control-table byte.
_RO, _EEPROM, _RAM = 0, 1, 2


def position_gains_si(p_gain: int, d_gain: int,
                      model: ServoModel = XM430_W350) -> tuple[float, float]:
    """(kp, kd) in SI units from the Position P/D gain registers (see module docstring)."""
    kp = p_gain / 128 * TICKS_PER_RAD * model.torque_per_pwm
    kd = model.back_emf_damping + d_gain / 16 * TICKS_PER_RAD * model.torque_per_pwm * 1e-3
    return kp, kd


def _access_map() -> bytes:
    access = bytearray([_RO] * dx.CONTROL_TABLE_SIZE)
    for addr in range(dx.ADDR_ID, dx.EEPROM_END):
        access[addr] = _EEPROM
    access[dx.ADDR_PROTOCOL_TYPE] = _EEPROM
    for addr, size in (
        (dx.ADDR_TORQUE_ENABLE, 1),
        (dx.ADDR_LED, 1),
        (dx.ADDR_STATUS_RETURN_LEVEL, 1),
        (dx.ADDR_VELOCITY_I_GAIN, dx.ADDR_REALTIME_TICK - dx.ADDR_VELOCITY_I_GAIN),  # 76..119
    ):
        for a in range(addr, addr + size):
            access[a] = _RAM
    return bytes(access)


_ACCESS = _access_map()


def _default_table(dxl_id: int, model: ServoModel) -> bytearray:
    t = bytearray(dx.CONTROL_TABLE_SIZE)

    def put(addr: int, fmt: str, value: int) -> None:
        struct.pack_into(fmt, t, addr, value)

    put(dx.ADDR_MODEL_NUMBER, "<H", model.model_number)
    put(dx.ADDR_FIRMWARE_VERSION, "<B", FIRMWARE_VERSION)
    put(dx.ADDR_ID, "<B", dxl_id)
    put(dx.ADDR_BAUD_RATE, "<B", 6)  # 4 Mbps
    put(dx.ADDR_RETURN_DELAY, "<B", 0)
    put(dx.ADDR_OPERATING_MODE, "<B", dx.OPERATING_MODE_POSITION)
    put(dx.ADDR_PROTOCOL_TYPE, "<B", 2)
    put(dx.ADDR_TEMPERATURE_LIMIT, "<B", 80)
    put(dx.ADDR_MAX_VOLTAGE_LIMIT, "<H", 160)
    put(dx.ADDR_MIN_VOLTAGE_LIMIT, "<H", 95)
    put(dx.ADDR_PWM_LIMIT, "<H", PWM_LIMIT)
    put(dx.ADDR_CURRENT_LIMIT, "<H", 1193)
    put(dx.ADDR_VELOCITY_LIMIT, "<I", 200)
    put(dx.ADDR_MAX_POSITION_LIMIT, "<I", TICKS_PER_REV - 1)
    put(dx.ADDR_MIN_POSITION_LIMIT, "<I", 0)
    put(dx.ADDR_SHUTDOWN, "<B", 52)  # overheating | electrical shock | overload
    put(dx.ADDR_STATUS_RETURN_LEVEL, "<B", 2)
    put(dx.ADDR_VELOCITY_I_GAIN, "<H", 1920)
    put(dx.ADDR_VELOCITY_P_GAIN, "<H", 100)
    put(dx.ADDR_POSITION_P_GAIN, "<H", 800)
    put(dx.ADDR_PRESENT_INPUT_VOLTAGE, "<H", 120)
    return t


class DynamixelEmulator(SerialServoEmulator):
    """X-series servos with ids `ids`, joint i of `actuators` behind servo ids[i]."""

    proto: ClassVar[ModuleType] = dx
    table_size = dx.CONTROL_TABLE_SIZE
    addr_id = dx.ADDR_ID
    addr_torque = dx.ADDR_TORQUE_ENABLE
    thread_name = "dynamixel-emulator"

    def __init__(
        self,
        actuators: Actuators,
        ids: Sequence[int],
        zero_ticks: Sequence[int] | None = None,
        direction: Sequence[int] | None = None,
        corrupt_probability: float = 0.0,
        seed: int = 0,
        models: Sequence[ServoModel] | None = None,
    ) -> None:
        self.models = list(models) if models is not None else [XM430_W350] * len(ids)
        if len(self.models) != len(ids):
            raise ValueError("models needs one entry per servo")
        super().__init__(actuators, ids, zero_ticks, direction, seed, CENTER_TICKS,
                         TICKS_PER_RAD)
        self.corrupt_probability = corrupt_probability

    @classmethod
    def from_config(cls, actuators: Actuators, bus: Any, models: list[str]) -> DynamixelEmulator:
        """The robot's servos as a `DynamixelBusConfig` names them (duck-typed), each of the
        model `models` names (its joint's, sim.robot.motors)."""
        return cls(actuators, bus.ids, zero_ticks=bus.zero_ticks, direction=bus.direction,
                   models=[SERVO_MODELS[m] for m in models])

    def _default_table(self, k: int, servo_id: int) -> bytearray:
        return _default_table(servo_id, self.models[k])

    # ---- instruction handling ----------------------------------------------------------------

    def handle(self, packet: dx.Packet) -> bytes:
        if packet.is_status:
            return b""
        if packet.instruction == dx.BULK_READ:
            return self._bulk_read(packet.params)
        return super().handle(packet)

    def _instruction(self, packet: dx.Packet) -> tuple[int, bytes]:
        return packet.instruction, packet.params

    def _head(self, params: bytes) -> tuple[int, int, bytes] | None:
        if len(params) < 4:
            return None
        addr, length = struct.unpack_from("<HH", params)
        return addr, length, params[4:]

    def _answers(self, k: int, instr: int) -> bool:
        level = self.tables[k][dx.ADDR_STATUS_RETURN_LEVEL]
        return instr == dx.PING or (instr == dx.READ and level >= 1) or level >= 2

    def _unicast(self, k: int, instr: int, params: bytes) -> Reply:
        table = self.tables[k]
        if instr == dx.PING:
            return 0, bytes(table[dx.ADDR_MODEL_NUMBER : dx.ADDR_MODEL_NUMBER + 2]) + bytes(
                (table[dx.ADDR_FIRMWARE_VERSION],)
            )
        if instr == dx.READ:
            if len(params) != 4:
                return dx.ERR_DATA_LENGTH, b""
            addr, length = struct.unpack("<HH", params)
            return self._read(k, addr, length)
        if instr == dx.WRITE:
            if len(params) < 3:
                return dx.ERR_DATA_LENGTH, b""
            (addr,) = struct.unpack_from("<H", params)
            return self._write(k, addr, params[2:]), b""
        if instr == dx.REBOOT:
            self._reboot(k)
            return 0, b""
        return dx.ERR_INSTRUCTION, b""

    def _status_error(self, k: int, error: int) -> int:
        hw = int(self.actuators.hw_error[k])
        self.tables[k][dx.ADDR_HARDWARE_ERROR_STATUS] = hw
        return error | dx.ERROR_ALERT if hw else error

    def _read(self, k: int, addr: int, length: int) -> Reply:
        if not self._in_table(addr, length):
            return dx.ERR_DATA_RANGE, b""
        self._refresh_present((k,))
        return 0, bytes(self.tables[k][addr : addr + length])

    def _bulk_read(self, params: bytes) -> bytes:
        """BULK READ: per servo its own address and length (ID, ADDR_L, ADDR_H, LEN_L, LEN_H
        each); every addressed servo answers with its own status packet, in the request's order
        (an unknown id or a range past the table: that servo stays silent, as a real one does)."""
        if not params or len(params) % 5:
            return b""
        asks = []
        for off in range(0, len(params), 5):
            dxl_id, addr, length = struct.unpack_from("<BHH", params, off)
            k = self._index_by_id.get(dxl_id, -1)
            if k >= 0 and not self.actuators.silent[k] and self._in_table(addr, length):
                asks.append((k, addr, length))
        self._refresh_present([k for k, _, _ in asks])
        out = bytearray()
        for k, addr, length in asks:
            out += self._status(k, 0, bytes(self.tables[k][addr : addr + length]))
        return bytes(out)

    def _sync_write_fast(self, addr: int, length: int, body: bytes) -> bool:
        if addr == dx.ADDR_GOAL_POSITION and length == 4:
            self._sync_write_goals(body)
            return True
        return False

    def _sync_write_goals(self, body: bytes) -> None:
        """The per-tick command: Goal Position for many servos. No actuator lock: each goal is
        one aligned float64 store (`_apply_goal`), and the lock can be held by a sim thread
        that lost the CPU to ordinary work (a reply must never wait for that)."""
        applied = []
        silent = self.actuators.silent
        for off in range(0, len(body), 5):
            k = self._index_by_id.get(body[off], -1)
            if k < 0 or silent[k]:
                continue
            table = self.tables[k]
            (goal,) = struct.unpack_from("<i", body, off + 1)
            lo, hi = struct.unpack_from("<ii", table, dx.ADDR_MAX_POSITION_LIMIT)[::-1]
            if lo <= goal <= hi:  # out of limits: the real servo drops it (no status to say so)
                table[dx.ADDR_GOAL_POSITION : dx.ADDR_GOAL_POSITION + 4] = body[off + 1 : off + 5]
                applied.append(k)
        for k in applied:
            self._apply_goal(k)

    def _write(self, k: int, addr: int, data: bytes) -> int:
        table = self.tables[k]
        end = addr + len(data)
        if end > self.table_size:
            return dx.ERR_DATA_RANGE
        torque_on = table[dx.ADDR_TORQUE_ENABLE] != 0
        for a in range(addr, end):
            access = _ACCESS[a]
            if access == _RO or (access == _EEPROM and torque_on):
                return dx.ERR_ACCESS
        if addr <= dx.ADDR_GOAL_POSITION < end:
            if end < dx.ADDR_GOAL_POSITION + 4 or addr > dx.ADDR_GOAL_POSITION:
                return dx.ERR_DATA_LENGTH
            (goal,) = struct.unpack_from("<i", data, dx.ADDR_GOAL_POSITION - addr)
            lo = struct.unpack_from("<i", table, dx.ADDR_MIN_POSITION_LIMIT)[0]
            hi = struct.unpack_from("<i", table, dx.ADDR_MAX_POSITION_LIMIT)[0]
            if not lo <= goal <= hi:
                return dx.ERR_DATA_LIMIT
        if addr <= dx.ADDR_TORQUE_ENABLE < end and data[dx.ADDR_TORQUE_ENABLE - addr] > 1:
            return dx.ERR_DATA_RANGE
        table[addr:end] = data
        self._apply_written(
            k, goal=addr <= dx.ADDR_GOAL_POSITION < end, renumbered=addr <= dx.ADDR_ID < end,
            torque=addr <= dx.ADDR_TORQUE_ENABLE < end,
            gains=addr < dx.ADDR_POSITION_P_GAIN + 2 and end > dx.ADDR_POSITION_D_GAIN)
        return 0

    def _reboot(self, k: int) -> None:
        """Reboot: RAM back to defaults (torque off, goal = present), latched error cleared."""
        fresh = _default_table(self.tables[k][dx.ADDR_ID], self.models[k])
        table = self.tables[k]
        table[dx.EEPROM_END :] = fresh[dx.EEPROM_END :]
        act = self.actuators
        with act.lock:
            act.hw_error[k] = 0
            act.torque_enabled[k] = False
            self._put_goal(k, self._q_to_ticks(k))
            self._apply_goal(k)
            self._apply_gains(k)

    # ---- control table <-> physics (callers hold actuators.lock where noted) ---------------

    def _cuts_torque(self, k: int) -> bool:
        return bool(self.actuators.hw_error[k] & self.tables[k][dx.ADDR_SHUTDOWN])

    def _put_goal(self, k: int, ticks: int) -> None:
        struct.pack_into("<i", self.tables[k], dx.ADDR_GOAL_POSITION, ticks)

    def _goal_ticks(self, k: int) -> int:
        return int(struct.unpack_from("<i", self.tables[k], dx.ADDR_GOAL_POSITION)[0])

    def _apply_gains(self, k: int) -> None:  # lock held
        t = self.tables[k]
        (d_gain,) = struct.unpack_from("<H", t, dx.ADDR_POSITION_D_GAIN)
        (p_gain,) = struct.unpack_from("<H", t, dx.ADDR_POSITION_P_GAIN)
        self.actuators.kp[k], self.actuators.kd[k] = position_gains_si(p_gain, d_gain,
                                                                       self.models[k])

    def _put_present(self, k: int, q: float, dq: float, tau: float, temperature: float) -> None:
        table, sign = self.tables[k], self.direction[k]
        pos = round(self.zero_ticks[k] + sign * q * TICKS_PER_RAD)
        vel = round(sign * dq / VELOCITY_UNIT_RAD_S)
        cur = round(sign * tau / TORQUE_CONSTANT_NM_PER_A / CURRENT_UNIT_A)
        cur = max(-32768, min(32767, cur))
        struct.pack_into("<hii", table, dx.ADDR_PRESENT_CURRENT, cur, vel, pos)
        table[dx.ADDR_HARDWARE_ERROR_STATUS] = int(self.actuators.hw_error[k])
        table[dx.ADDR_PRESENT_TEMPERATURE] = max(0, min(255, round(temperature)))


def _serve_in_process(ids: list[int], q: list[float], emulator_class: str,
                      conn: Connection) -> None:
    from drivers.bus_family import resolve

    actuators = Actuators(len(ids))
    actuators.q[:] = q
    emulator = resolve(emulator_class)(actuators, ids)
    conn.send(emulator.open())
    emulator.start()
    try:
        conn.recv()  # until the parent asks to stop or goes away
    except EOFError:
        pass
    emulator.stop()


class EmulatorProcess:
    """Servos with static joint positions in a child process, so a client measured in this
    process does not share its interpreter (GIL, allocations) with the emulator.
    `emulator_class` ("module:Class", constructed with (actuators, ids)) picks the family."""

    def __init__(self, ids: Sequence[int], q: Sequence[float] | None = None,
                 emulator_class: str = "sim.dynamixel_emulator:DynamixelEmulator") -> None:
        self.emulator_class = emulator_class
        self.ids = list(ids)
        self.q = list(q) if q is not None else [0.0] * len(self.ids)
        self._process: BaseProcess | None = None
        self._conn: Connection | None = None

    def start(self) -> str:
        """Start the child; return the pty path its servos answer on."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_serve_in_process, args=(self.ids, self.q, self.emulator_class, child),
            daemon=True
        )
        self._process.start()
        child.close()
        if not self._conn.poll(30):
            self.stop()
            raise RuntimeError("emulator process did not start")
        try:
            return str(self._conn.recv())
        except EOFError:
            self.stop()
            raise RuntimeError("emulator process exited during start") from None

    def stop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.send("stop")
            except OSError:
                pass
            self._conn.close()
            self._conn = None
        if self._process is not None:
            self._process.join(timeout=5)
            if self._process.is_alive():
                self._process.kill()
            self._process = None

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
