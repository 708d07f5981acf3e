"""MIT-mode dialects: how each motor family frames the shared bit layout (drivers/mit_codec.py).

One small class per dialect behind one interface, chosen by config `bus.dialect` (the
python-can way: no branches on the dialect name in the bus or the emulator). A dialect says
which arbitration ids carry what, how a reply names its motor, what else a reply carries
(status, temperatures) and which special frames exist. Both ends use it: `MitCanBus` speaks
the host side, the sim's `MitCanEmulator` the motor side.

    dialect     command id   reply                                     special frames
    generic     id           id8 | state (6 B), on master id or 0      FC enter, FD exit, FE zero
    damiao      id           ERR4 ID4 | state | T_mos T_rotor (8 B)    + FB clear error; 0x7FF:
                             on MST_ID                                 CC refresh, 33 read reg
    cubemars    id           id8 | state | T+40 | error (8 B)          FC, FD, FE
    myactuator  0x400 + id   0x500 + id: id8 | state | 0 0 (8 B)       0x140 + id: 80 shutdown,
                                                                       92 read angle

Sources (the conformance tests cite the same): Katz's motorcontrol firmware and
mini-cheetah-motor-driver-socketcan 0.4.3 (generic); damiao-motor 1.0.6 and pydamiao 0.1.4
(Damiao); motor-python 0.0.11 and the CubeMars "AK Series Module Driver User Manual
V1.0.15.X" §5.3 (CubeMars); "MYACTUATOR Servo Motor Control Protocol V4.2" §5 (MyActuator).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from drivers.mit_codec import MitRanges, pack_state_into, unpack_state

if TYPE_CHECKING:  # the config imports this table: no CAN stack on a serial robot's start
    import can

Frame = tuple[int, bytes]  # (arbitration id, data)

ENTER_MOTOR_MODE = bytes([0xFF] * 7 + [0xFC])
EXIT_MOTOR_MODE = bytes([0xFF] * 7 + [0xFD])
ZERO_POSITION = bytes([0xFF] * 7 + [0xFE])
CLEAR_ERROR = bytes([0xFF] * 7 + [0xFB])
HOST_ID = 0  # arbitration id of replies when no master ids are configured (Katz firmware)
_SPECIAL = {ENTER_MOTOR_MODE: "enable", EXIT_MOTOR_MODE: "disable", ZERO_POSITION: "zero",
            CLEAR_ERROR: "clear"}


def malformed(msg: can.Message) -> str | None:
    """Why a frame cannot be decoded at all (None: it can): the reason it is counted under.

    A dlc says how many data bytes a frame carries; python-can takes both from the interface
    and never checks them against each other, so a frame claiming more than it holds (a
    hostile or broken interface, a forged datagram) would index past its data. The dialects
    go by the data itself (len(msg.data)), never by the dlc."""
    if not msg.is_remote_frame and msg.dlc > len(msg.data):
        return "dlc beyond its data"
    return None


class Reply:
    """One decoded state reply (reused: the tick allocates no reply objects)."""

    __slots__ = ("code", "mit_fields", "p", "t", "temperature_c", "v")

    def __init__(self) -> None:
        self.p = self.v = self.t = 0.0
        self.mit_fields = True  # p, v, t are truncated MIT fields (lower edge of their code)
        self.code = 0  # dialect status/error code, 0 where the dialect reports none
        self.temperature_c = float("nan")  # hottest reported temperature


class MitDialect:
    """Host and motor side of one motor family's MIT-mode framing."""

    name: ClassVar[str]
    reply_dlc: ClassVar[int]  # bytes of a state reply (the budget's worst case)
    supports_fd: ClassVar[bool] = False
    # the state reply says whether torque is on (so `present_goal` can know)
    reports_torque_state: ClassVar[bool] = False
    # Range registers the motor stores (config key -> register id), checked at open
    range_registers: ClassVar[dict[str, int]] = {}
    # emulator: sim fault name -> the code this dialect reports for it (empty: none reported)
    fault_codes: ClassVar[dict[str, int]] = {}

    def __init__(self, ids: Sequence[int], master_ids: Sequence[int] | None = None) -> None:
        n = len(ids)
        if len(set(ids)) != n or not all(0 < i < 0x800 for i in ids):
            raise ValueError(f"{self.name}: ids must be distinct 11-bit ids > 0, got {list(ids)}")
        if master_ids is not None and (len(master_ids) != n or len(set(master_ids)) != n
                                       or not all(0 <= m < 0x800 for m in master_ids)):
            raise ValueError(f"{self.name}: master_ids must be {n} distinct 11-bit ids,"
                             f" got {list(master_ids)}")
        self.ids = list(ids)
        self.master_ids = list(master_ids) if master_ids is not None else None
        self._by_id = {i: j for j, i in enumerate(ids)}
        self._by_master = ({m: j for j, m in enumerate(master_ids)}
                           if master_ids is not None else None)
        self._by_low_nibble = {i & 0xF: j for j, i in enumerate(ids)}

    # -- host side: frames to the motor ---------------------------------------------------

    def command_id(self, j: int) -> int:
        return self.ids[j]

    def enable(self, j: int) -> Frame | None:
        """Frame that turns torque on; None: the next command does (the bus then sends it)."""
        return self.ids[j], ENTER_MOTOR_MODE

    def disable(self, j: int) -> Frame:
        return self.ids[j], EXIT_MOTOR_MODE

    def zero(self, j: int) -> Frame | None:
        return self.ids[j], ZERO_POSITION

    def clear_error(self, j: int) -> Frame | None:
        return None

    def query(self, j: int) -> Frame | None:
        """A frame the motor answers with its state without changing what it does, if any."""
        return None

    def read_register(self, j: int, rid: int) -> Frame | None:
        return None

    # -- host side: frames from the motor -------------------------------------------------

    def motor_of(self, msg: can.Message) -> int:
        """Index of the motor a frame comes from, -1 for anything else on the bus."""
        if msg.is_error_frame or msg.is_remote_frame or len(msg.data) < 6:
            return -1
        if self._by_master is not None:
            return self._by_master.get(msg.arbitration_id, -1)
        return self._by_id.get(msg.data[0], -1)

    def parse(self, msg: can.Message, r: MitRanges, out: Reply) -> bool:
        """Decode a state reply into `out`; False for a frame that only acknowledges."""
        out.p, out.v, out.t = unpack_state(msg.data, 1, r)
        return True

    def register_value(self, msg: can.Message, j: int, rid: int) -> float | None:
        """The value if `msg` answers a read of register `rid` of motor j."""
        return None

    def fault(self, code: int) -> str | None:
        """Name of the fault a status code reports, None when healthy."""
        return None

    def torque_on(self, code: int) -> bool:
        return False

    # -- motor side (the sim's emulator) --------------------------------------------------

    def classify(self, msg: can.Message) -> tuple[str, int]:
        """(kind, motor index) of a host frame: command, enable, disable, zero, clear, query,
        register (register read); kind "" for a frame that is not for these motors."""
        j = self._by_id.get(msg.arbitration_id, -1)
        if j < 0 or msg.is_extended_id or msg.is_remote_frame or len(msg.data) != 8:
            return "", -1
        special = _SPECIAL.get(bytes(msg.data), "command")
        if special == "clear" and self.clear_error(j) is None:
            return "", -1
        return special, j

    def state_reply(self, j: int, p: float, v: float, t: float, code: int,
                    temperature_c: float, r: MitRanges) -> Frame:
        data = bytearray(6)
        data[0] = self.ids[j] & 0xFF
        pack_state_into(data, 1, p, v, t, r)
        return self._reply_id(j), bytes(data)

    def query_reply(self, j: int, p: float, v: float, t: float, code: int,
                    temperature_c: float, r: MitRanges) -> Frame:
        return self.state_reply(j, p, v, t, code, temperature_c, r)

    def ack_reply(self, j: int, request: bytes) -> Frame | None:
        """Answer to a frame that is not a command, when it is not a state reply."""
        return None

    def register_reply(self, j: int, rid: int, value: float) -> Frame | None:
        return None

    def _reply_id(self, j: int) -> int:
        return self.master_ids[j] if self.master_ids is not None else HOST_ID


class GenericDialect(MitDialect):
    """Ben Katz's mini-cheetah motor firmware: the origin of MIT mode."""

    name = "generic"
    reply_dlc = 6

    def __init__(self, ids: Sequence[int], master_ids: Sequence[int] | None = None) -> None:
        super().__init__(ids, master_ids)
        if master_ids is None and not all(i <= 0xFF for i in ids):
            raise ValueError("generic: replies name the motor in one byte; ids above 255"
                             " need master_ids")


class DamiaoDialect(MitDialect):
    """Damiao DM-J series: status nibble, temperatures, registers, refresh frame, CAN FD."""

    name = "damiao"
    reply_dlc = 8
    supports_fd = True
    reports_torque_state = True
    range_registers: ClassVar[dict[str, int]] = {"p_max": 21, "v_max": 22, "t_max": 23}
    fault_codes: ClassVar[dict[str, int]] = {
        "input voltage": 0x9, "electrical shock": 0xA, "overheating": 0xC, "overload": 0xE}
    REGISTER_NAMES: ClassVar[dict[int, str]] = {21: "PMAX", 22: "VMAX", 23: "TMAX"}
    STATES: ClassVar[dict[int, str]] = {
        0x0: "disabled", 0x1: "enabled", 0x8: "over-voltage", 0x9: "under-voltage",
        0xA: "over-current", 0xB: "MOS over-temperature", 0xC: "rotor over-temperature",
        0xD: "lost communication", 0xE: "overload"}
    CONTROL_ID = 0x7FF  # refresh and register requests
    READ, WRITE, REFRESH = 0x33, 0x55, 0xCC

    def __init__(self, ids: Sequence[int], master_ids: Sequence[int] | None = None) -> None:
        super().__init__(ids, master_ids)
        if master_ids is None and len({i & 0xF for i in ids}) != len(ids):
            raise ValueError("damiao: without master_ids a reply names its motor by the low 4"
                             f" bits of its id; ids {list(ids)} collide there")

    def clear_error(self, j: int) -> Frame:
        return self.ids[j], CLEAR_ERROR

    def query(self, j: int) -> Frame:
        i = self.ids[j]
        return self.CONTROL_ID, bytes((i & 0xFF, i >> 8, self.REFRESH, 0, 0, 0, 0, 0))

    def read_register(self, j: int, rid: int) -> Frame:
        i = self.ids[j]
        return self.CONTROL_ID, bytes((i & 0xFF, i >> 8, self.READ, rid, 0, 0, 0, 0))

    def motor_of(self, msg: can.Message) -> int:
        if msg.is_error_frame or msg.is_remote_frame or len(msg.data) < 8:
            return -1
        if self._by_master is not None:
            return self._by_master.get(msg.arbitration_id, -1)
        return self._by_low_nibble.get(msg.data[0] & 0xF, -1)

    def parse(self, msg: can.Message, r: MitRanges, out: Reply) -> bool:
        data = msg.data
        out.p, out.v, out.t = unpack_state(data, 1, r)
        out.code = data[0] >> 4
        out.temperature_c = float(max(data[6], data[7]))
        return True

    def register_value(self, msg: can.Message, j: int, rid: int) -> float | None:
        data = msg.data
        i = self.ids[j]
        if (len(msg.data) == 8 and data[2] == self.READ and data[3] == rid
                and data[0] | (data[1] << 8) == i):
            return float(struct.unpack_from("<f", data, 4)[0])
        return None

    def fault(self, code: int) -> str | None:
        if code in (0x0, 0x1):
            return None
        return self.STATES.get(code, f"unknown state {code:#x}")

    def torque_on(self, code: int) -> bool:
        return code == 0x1

    def classify(self, msg: can.Message) -> tuple[str, int]:
        if msg.arbitration_id == self.CONTROL_ID and len(msg.data) == 8 and not msg.is_extended_id:
            data = msg.data
            j = self._by_id.get(data[0] | (data[1] << 8), -1)
            kind = {self.REFRESH: "query", self.READ: "register"}.get(data[2], "")
            return (kind, j) if kind and j >= 0 else ("", -1)
        return super().classify(msg)

    def state_reply(self, j: int, p: float, v: float, t: float, code: int,
                    temperature_c: float, r: MitRanges) -> Frame:
        data = bytearray(8)
        data[0] = ((code & 0xF) << 4) | (self.ids[j] & 0xF)
        pack_state_into(data, 1, p, v, t, r)
        data[6] = data[7] = max(0, min(255, round(temperature_c)))
        return self._reply_id(j), bytes(data)

    def register_reply(self, j: int, rid: int, value: float) -> Frame:
        i = self.ids[j]
        data = bytes((i & 0xFF, i >> 8, self.READ, rid)) + struct.pack("<f", value)
        return self._reply_id(j), data


class CubeMarsDialect(MitDialect):
    """CubeMars AK series in MIT (force control) mode, firmware V1.x/V2 standard frames."""

    name = "cubemars"
    reply_dlc = 8
    fault_codes: ClassVar[dict[str, int]] = {
        "overheating": 1, "electrical shock": 2, "overload": 2, "input voltage": 4,
        "motor encoder": 5}
    ERRORS: ClassVar[dict[int, str]] = {
        1: "over-temperature", 2: "over-current", 3: "over-voltage", 4: "under-voltage",
        5: "encoder fault", 6: "phase current unbalance (the hardware may be damaged)"}
    # Byte 6 is degrees C + 40 (-40..215 °C). The manual (V1.0.8 §5.3, "MIT power mode driver
    # board sending data definition") names DATA[6] only "Motor temperature", no unit or
    # offset; TMotor's support answered that the reading is "subtracted by 40 to obtain the
    # temperature", with over-temperature protection at 140 °C (quoted in neurobionics/
    # TMotorCANControl PR #4, 2023-03-17, whose author found the raw byte tripping that
    # library's over-temperature check at room temperature), and motor-python 0.0.11 decodes
    # MIT feedback as `temp_raw - 40` ("byte 6 : temperature, offset by 40 degrees Celsius").
    # TMotorCANControl's mit_can.py reads it raw: 40 °C high. (The AK60-6 V3 servo-mode status
    # frame is another frame: int8 °C.)
    TEMPERATURE_OFFSET = 40

    def parse(self, msg: can.Message, r: MitRanges, out: Reply) -> bool:
        data = msg.data
        out.p, out.v, out.t = unpack_state(data, 1, r)
        if len(data) >= 8:  # older AK firmware answers 6 bytes without these two
            out.temperature_c = float(data[6] - self.TEMPERATURE_OFFSET)
            out.code = data[7]
        return True

    def fault(self, code: int) -> str | None:
        if code == 0:
            return None
        return self.ERRORS.get(code, f"error code {code}")

    def state_reply(self, j: int, p: float, v: float, t: float, code: int,
                    temperature_c: float, r: MitRanges) -> Frame:
        data = bytearray(8)
        data[0] = self.ids[j] & 0xFF
        pack_state_into(data, 1, p, v, t, r)
        data[6] = max(0, min(255, round(temperature_c) + self.TEMPERATURE_OFFSET))
        data[7] = code & 0xFF
        return self._reply_id(j), bytes(data)


class MyActuatorDialect(MitDialect):
    """MyActuator RMD-X "motion mode control" (0x400 + id), protocol V4.2 §5.

    A motion-mode command (re)starts a motor, so nothing but a command may enable one and no
    query may be a command: the state query is the servo protocol's "read multi-turn angle"
    (0x92, §2.12: int32 0.01 deg/LSB in bytes 4..7), which reports no velocity or torque.
    """

    name = "myactuator"
    reply_dlc = 8
    COMMAND_BASE, REPLY_BASE = 0x400, 0x500  # motion mode
    SERVO_BASE, SERVO_REPLY_BASE = 0x140, 0x240  # the servo protocol (shutdown, angle)
    SHUTDOWN, READ_ANGLE = 0x80, 0x92
    RAD_PER_LSB = math.pi / 18000.0  # 0.01 degree

    def __init__(self, ids: Sequence[int], master_ids: Sequence[int] | None = None) -> None:
        if not all(1 <= i <= 32 for i in ids):
            raise ValueError(f"myactuator: motor ids are 1..32, got {', '.join(map(str, ids))}")
        if master_ids is not None:
            raise ValueError("myactuator: replies come on 0x500 + id; master_ids do not apply")
        super().__init__(ids, None)

    def command_id(self, j: int) -> int:
        return self.COMMAND_BASE + self.ids[j]

    def enable(self, j: int) -> None:
        return None  # a motion-mode command starts the motor

    def disable(self, j: int) -> Frame:
        return self.SERVO_BASE + self.ids[j], bytes((self.SHUTDOWN, 0, 0, 0, 0, 0, 0, 0))

    def zero(self, j: int) -> None:
        return None  # 0x64 writes ROM and applies after a power cycle: use the vendor tool

    def query(self, j: int) -> Frame:
        return self.SERVO_BASE + self.ids[j], bytes((self.READ_ANGLE, 0, 0, 0, 0, 0, 0, 0))

    def motor_of(self, msg: can.Message) -> int:
        if msg.is_error_frame or msg.is_remote_frame or msg.is_extended_id or len(msg.data) < 6:
            return -1
        j = self._by_id.get(msg.arbitration_id - self.REPLY_BASE, -1)  # ids are 1..32, so
        if j < 0:  # 0x501..0x520 and 0x241..0x260 never overlap
            j = self._by_id.get(msg.arbitration_id - self.SERVO_REPLY_BASE, -1)
        return j

    def parse(self, msg: can.Message, r: MitRanges, out: Reply) -> bool:
        data = msg.data
        if msg.arbitration_id >= self.REPLY_BASE:
            out.p, out.v, out.t = unpack_state(data, 1, r)
            out.mit_fields = True
            return True
        if data[0] == self.READ_ANGLE and len(msg.data) == 8:
            out.p = struct.unpack_from("<i", data, 4)[0] * self.RAD_PER_LSB
            out.v = out.t = 0.0
            out.mit_fields = False
            return True
        return False  # an acknowledgement (shutdown)

    def classify(self, msg: can.Message) -> tuple[str, int]:
        if msg.is_extended_id or msg.is_remote_frame or len(msg.data) != 8:
            return "", -1
        arb = msg.arbitration_id
        if arb - self.COMMAND_BASE in self._by_id:
            return "command", self._by_id[arb - self.COMMAND_BASE]
        j = self._by_id.get(arb - self.SERVO_BASE, -1)
        kind = {self.SHUTDOWN: "disable", self.READ_ANGLE: "query"}.get(msg.data[0], "")
        return (kind, j) if kind and j >= 0 else ("", -1)

    def state_reply(self, j: int, p: float, v: float, t: float, code: int,
                    temperature_c: float, r: MitRanges) -> Frame:
        data = bytearray(8)
        data[0] = self.ids[j]
        pack_state_into(data, 1, p, v, t, r)
        return self.REPLY_BASE + self.ids[j], bytes(data)

    def query_reply(self, j: int, p: float, v: float, t: float, code: int,
                    temperature_c: float, r: MitRanges) -> Frame:
        angle = struct.pack("<i", round(p / self.RAD_PER_LSB))
        return self.SERVO_REPLY_BASE + self.ids[j], bytes((self.READ_ANGLE, 0, 0, 0)) + angle

    def ack_reply(self, j: int, request: bytes) -> Frame:
        return self.SERVO_REPLY_BASE + self.ids[j], bytes(request)


DIALECTS: dict[str, type[MitDialect]] = {
    d.name: d for d in (GenericDialect, DamiaoDialect, CubeMarsDialect, MyActuatorDialect)}


def dialect_class(name: str) -> type[MitDialect]:
    try:
        return DIALECTS[name]
    except KeyError:
        raise ValueError(f"unknown MIT dialect {name!r} (known: {', '.join(DIALECTS)})") from None
