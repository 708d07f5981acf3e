"""Feetech STS/SCS wire codec (the "FT-SCS" protocol), shared by the driver and the emulator.

Packet layout (one byte per field unless noted):

    FF FF | ID | LEN | INSTR | PARAMS... | CHECKSUM        instruction
    FF FF | ID | LEN | ERROR | PARAMS... | CHECKSUM        status (the servo's answer)

LEN counts INSTR/ERROR, the params and the checksum (params + 2). CHECKSUM = ~(ID + LEN +
INSTR/ERROR + params) & 0xFF. There is no byte stuffing: FF FF may occur inside params, so a
reader finds a packet by its header, a plausible id and length, and the checksum. Addresses and
lengths are one byte. Two-byte registers are little-endian on the STS/SMS series and
big-endian on the SCS series (the SDK's `scs_end` 0 and 1). Signed STS fields are
sign-magnitude: bit 15 (position, speed, current) or bit 10 (load) is the sign.

Verified against Feetech's Python SDK (`ftservo-python-sdk`, module scservo_sdk: scservo_def,
protocol_packet_handler, sms_sts and scscl) by tests/test_feetech_conformance.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from drivers import servo_wire
from drivers.servo_wire import (
    PacketStream,
    SyncReplies,
    check_id,
    sync_read_ids,
    sync_write_params,
)

HEADER = b"\xff\xff"
BROADCAST_ID = servo_wire.BROADCAST_ID
MAX_ID = servo_wire.MAX_ID  # scservo_def.MAX_ID
FAMILY = "Feetech"  # in messages
HEADER_BYTES = 4  # FF FF, id, length
STATUS_OVERHEAD = 6  # header(2), id, length, error, checksum

# Instructions
PING = 0x01
READ = 0x02
WRITE = 0x03
REG_WRITE = 0x04  # staged until ACTION
ACTION = 0x05
SYNC_READ = 0x82
SYNC_WRITE = 0x83

# Status error byte (the SDK's ERRBIT_*): each bit a protection the servo tripped.
ERR_VOLTAGE = 0x01
ERR_ANGLE = 0x02  # magnetic angle sensor
ERR_OVERHEAT = 0x04
ERR_OVERCURRENT = 0x08  # the SDK's "OverEle"
ERR_OVERLOAD = 0x20
ERROR_NAMES = {
    ERR_VOLTAGE: "input voltage",
    ERR_ANGLE: "angle sensor",
    ERR_OVERHEAT: "overheat",
    ERR_OVERCURRENT: "overcurrent",
    ERR_OVERLOAD: "overload",
}

# STS/SMS memory table (STS3215), address; two bytes where noted. EEPROM below 40.
ADDR_FIRMWARE_MAJOR = 0
ADDR_FIRMWARE_MINOR = 1
ADDR_MODEL_NUMBER = 3  # 2 B
ADDR_ID = 5
ADDR_BAUD_RATE = 6  # index into BAUD_RATES
ADDR_RETURN_DELAY = 7  # unit 2 µs
ADDR_STATUS_RETURN_LEVEL = 8  # 0: answer PING and READ only, 1: answer every instruction
ADDR_MIN_POSITION_LIMIT = 9  # 2 B
ADDR_MAX_POSITION_LIMIT = 11  # 2 B
ADDR_MAX_TEMPERATURE = 13  # °C
ADDR_MAX_VOLTAGE = 14  # 0.1 V
ADDR_MIN_VOLTAGE = 15  # 0.1 V
ADDR_MAX_TORQUE = 16  # 2 B, 0.1 % of stall torque
ADDR_UNLOADING_CONDITION = 19  # error bits that switch torque off
ADDR_LED_ALARM_CONDITION = 20
ADDR_P_COEFFICIENT = 21
ADDR_D_COEFFICIENT = 22
ADDR_I_COEFFICIENT = 23
ADDR_HOMING_OFFSET = 31  # 2 B, sign bit 11
ADDR_MODE = 33  # 0 position (servo), 1 wheel (speed), 2 PWM, 3 step
EEPROM_END = 40
ADDR_TORQUE_ENABLE = 40
ADDR_ACCELERATION = 41  # 100 step/s², 0 = no ramp
ADDR_GOAL_POSITION = 42  # 2 B, sign bit 15
ADDR_GOAL_TIME = 44  # 2 B
ADDR_GOAL_SPEED = 46  # 2 B, step/s, 0 = the servo's maximum
ADDR_TORQUE_LIMIT = 48  # 2 B, 0.1 %
ADDR_LOCK = 55  # 1 = EEPROM write-protected (SCS series: 48)
ADDR_PRESENT_POSITION = 56  # 2 B, sign bit 15
ADDR_PRESENT_SPEED = 58  # 2 B, step/s, sign bit 15
ADDR_PRESENT_LOAD = 60  # 2 B, 0.1 % of stall torque, sign bit 10
ADDR_PRESENT_VOLTAGE = 62  # 0.1 V
ADDR_PRESENT_TEMPERATURE = 63  # °C
ADDR_STATUS = 65  # the error bits of the last status
ADDR_MOVING = 66
ADDR_PRESENT_CURRENT = 69  # 2 B, 6.5 mA, sign bit 15
MEMORY_SIZE = 71  # through Present Current; factory registers (71+) are not modelled

SIGN_BIT_POSITION = 15
SIGN_BIT_SPEED = 15
SIGN_BIT_LOAD = 10
SIGN_BIT_CURRENT = 15
SIGN_BIT_HOMING_OFFSET = 11

MODE_POSITION = 0

# Baud Rate register (6) -> bit/s (sms_sts.SMS_STS_1M .. SMS_STS_38400; SCS the same).
BAUD_RATES = {0: 1_000_000, 1: 500_000, 2: 250_000, 3: 128_000, 4: 115_200, 5: 76_800,
              6: 57_600, 7: 38_400}


@dataclass(frozen=True)
class Series:
    """What differs between the STS/SMS and SCS series on the wire."""

    name: str
    big_endian: bool  # two-byte registers high byte first (SCS)
    lock_addr: int  # the EEPROM lock register
    position_signed: bool  # Goal/Present Position sign-magnitude at bit 15 (STS)


STS = Series("sts", big_endian=False, lock_addr=ADDR_LOCK, position_signed=True)
SCS = Series("scs", big_endian=True, lock_addr=48, position_signed=False)


@dataclass(frozen=True)
class ServoModel:
    """One servo model: its series and units (datasheet figures at its rated voltage)."""

    name: str
    model_number: int  # Model Number register (3)
    series: Series
    ticks_per_rad: float
    center_ticks: int  # the position read as 0 rad unless a joint's zero_ticks says otherwise
    max_ticks: int
    stall_torque_nm: float  # what Present Load 1000 (100 %) stands for
    no_load_rpm: float

    @property
    def speed_unit_rad_s(self) -> float:  # Present Speed counts steps per second
        return 1.0 / self.ticks_per_rad


# STS3215 (7.4 V, 1/345 gear; the SO-100/SO-101 servo): 4096 steps over 360°, 19.5 kg·cm
# (1.91 N·m) stall, 0.222 s/60° no load (45 rpm). SCS0009: 1024 steps over 300°.
STS3215 = ServoModel("STS3215", 777, STS, 4096 / (2 * math.pi), 2048, 4095, 1.91, 45.0)
STS3250 = ServoModel("STS3250", 2825, STS, 4096 / (2 * math.pi), 2048, 4095, 4.9, 46.0)
SCS0009 = ServoModel("SCS0009", 1284, SCS, 1024 / math.radians(300), 512, 1023, 0.23, 55.0)
MODELS = {m.name: m for m in (STS3215, STS3250, SCS0009)}
MODELS_BY_NUMBER = {m.model_number: m for m in MODELS.values()}


class PacketError(ValueError):
    """A byte sequence is not a valid FT-SCS packet."""


def checksum(data: bytes | bytearray | memoryview, start: int = 2, end: int | None = None) -> int:
    """~(sum of data[start:end]) & 0xFF: id through the last param, header excluded."""
    total = 0
    for i in range(start, len(data) if end is None else end):
        total += data[i]
    return ~total & 0xFF


def to_sign_magnitude(value: int, sign_bit: int) -> int:
    """A signed integer as the servo stores it: |value| with `sign_bit` set when negative."""
    magnitude = -value if value < 0 else value
    if magnitude >= 1 << sign_bit:
        raise ValueError(f"{value} does not fit {sign_bit} magnitude bits")
    return magnitude | (1 << sign_bit) if value < 0 else magnitude


def from_sign_magnitude(raw: int, sign_bit: int) -> int:
    """The signed integer of a sign-magnitude register (bits above `sign_bit` ignored)."""
    magnitude = raw & ((1 << sign_bit) - 1)
    return -magnitude if raw & (1 << sign_bit) else magnitude


def word(value: int, series: Series = STS) -> bytes:
    """A two-byte register value in the series' byte order."""
    return (value & 0xFFFF).to_bytes(2, "big" if series.big_endian else "little")


def unword(data: bytes | bytearray | memoryview, at: int = 0, series: Series = STS) -> int:
    lo, hi = (data[at + 1], data[at]) if series.big_endian else (data[at], data[at + 1])
    return lo | (hi << 8)


def _frame(servo_id: int, code: int, params: bytes) -> bytes:
    if len(params) > 250 - STATUS_OVERHEAD:  # the SDK's TXPACKET_MAX_LEN
        raise ValueError(f"{len(params)} parameter bytes do not fit one packet")
    packet = bytearray(HEADER)
    packet += bytes((servo_id, len(params) + 2, code & 0xFF))
    packet += params
    packet.append(checksum(packet))
    return bytes(packet)


def instruction_packet(servo_id: int, instruction: int, params: bytes = b"") -> bytes:
    check_id(servo_id, FAMILY)
    return _frame(servo_id, instruction, params)


def status_packet(servo_id: int, error: int, params: bytes = b"") -> bytes:
    check_id(servo_id, FAMILY, allow_broadcast=False)
    return _frame(servo_id, error & 0x7F, params)


def ping_packet(servo_id: int) -> bytes:
    return instruction_packet(servo_id, PING)


def read_packet(servo_id: int, address: int, length: int) -> bytes:
    return instruction_packet(servo_id, READ, bytes((address, length)))


def write_packet(servo_id: int, address: int, data: bytes) -> bytes:
    return instruction_packet(servo_id, WRITE, bytes((address,)) + data)


def reg_write_packet(servo_id: int, address: int, data: bytes) -> bytes:
    return instruction_packet(servo_id, REG_WRITE, bytes((address,)) + data)


def action_packet(servo_id: int = BROADCAST_ID) -> bytes:
    return instruction_packet(servo_id, ACTION)


def sync_read_packet(address: int, length: int, ids: Sequence[int]) -> bytes:
    params = bytes((address, length)) + sync_read_ids(ids, FAMILY)
    return instruction_packet(BROADCAST_ID, SYNC_READ, params)


def sync_write_packet(address: int, length: int, data: Mapping[int, bytes]) -> bytes:
    params = sync_write_params(bytes((address, length)), length, data, FAMILY)
    return instruction_packet(BROADCAST_ID, SYNC_WRITE, params)


@dataclass(frozen=True)
class Packet:
    """One packet: `code` is the instruction (servo-bound) or the error byte (a status)."""

    id: int
    code: int
    params: bytes


def parse_packet(data: bytes | bytearray) -> Packet:
    """Parse exactly one packet; PacketError says why not."""
    if len(data) < STATUS_OVERHEAD or data[:2] != HEADER:
        raise PacketError(f"no FF FF header in {bytes(data[:6]).hex(' ')}")
    if data[3] < 2 or len(data) != HEADER_BYTES + data[3]:
        raise PacketError(f"length field {data[3]} but {len(data) - HEADER_BYTES} bytes follow")
    if checksum(data, 2, len(data) - 1) != data[-1]:
        raise PacketError("checksum mismatch")
    return Packet(data[2], data[4], bytes(data[5:-1]))


def decode_errors(bits: int) -> list[str]:
    """Names of the set status error bits (unknown bits as 'bit N')."""
    return [ERROR_NAMES.get(1 << b, f"bit {b}") for b in range(8) if bits & (1 << b)]


class StreamParser(PacketStream):
    """Incremental parser: feed chunks, iterate over the complete valid packets.

    Bytes before a header are skipped and counted; a header whose id, length or checksum is
    impossible is dropped one byte at a time, so the next real header is found (FF FF inside a
    packet's params can fake a header: its checksum fails (`crc_errors`) and the scan moves
    on)."""

    def __init__(self, max_length: int = 250) -> None:
        super().__init__(max_length)

    def next_packet(self) -> Packet | None:
        buf = self._buf
        while True:
            if not self._skip_to(HEADER):
                return None
            if len(buf) < HEADER_BYTES:
                return None
            if buf[2] == 0xFF:  # FF FF FF: the header starts one byte later
                self.garbage_bytes += 1
                del buf[:1]
                continue
            length = buf[3]
            if length < 2 or length > self.max_length:
                self.length_errors += 1
                del buf[:1]
                continue
            total = HEADER_BYTES + length
            if len(buf) < total:
                return None
            if checksum(buf, 2, total - 1) != buf[total - 1]:
                self.crc_errors += 1
                del buf[:1]
                continue
            packet = Packet(buf[2], buf[4], bytes(buf[5 : total - 1]))
            del buf[:total]
            return packet


LOST_REPLY = "no reply (the next servo answered first)"
GARBLED_REPLY = "reply garbled (header or id)"


class SyncReplyParser(SyncReplies):
    """The status packets answering one SYNC READ, resolved servo by servo as bytes arrive.

    Every reply has the same, known length (`data_len` + 6), and the servos answer in the
    order of the request's id list. So a header with another length field is corrupt (no
    waiting for bytes it claims), a checksum failure drops that header at once, a valid reply
    from a servo settles every earlier servo still unheard (its reply was lost), and once
    the bytes of all replies are in, a servo still unsettled had its header or id garbled. A
    corrupt candidate is blamed on the servo its id byte names when that one is unsettled,
    else on the first unsettled servo; a valid reply arriving later clears the blame. The
    other servos' replies are kept: one corrupt byte fails one servo, not the transaction.
    `offset[k]` is where servo k's data starts in the receive buffer.
    """

    lost_reply = LOST_REPLY

    def __init__(self, ids: Sequence[int], data_len: int) -> None:
        super().__init__(ids, data_len)
        self.reply_len = data_len + STATUS_OVERHEAD
        self.expected = self.n * self.reply_len  # bytes of every reply together

    def _blame(self, k: int, reason: str) -> None:
        """The servo the id byte names when that one is unsettled, else the first unsettled."""
        if k < 0 or self.seen[k] or self.bad[k] is not None:
            self._blame_first(reason)
        else:
            self._settle(k, reason)

    def feed(self, rx: bytearray, got: int) -> bool:
        """Parse rx[pos:got]; True once every servo is settled (seen, or blamed)."""
        pos, want = self.pos, self.data_len + 2
        while got - pos >= STATUS_OVERHEAD:
            h = rx.find(HEADER, pos, got)
            if h < 0:
                pos = got - 1 if rx[got - 1] == 0xFF else got
                break
            if got - h < HEADER_BYTES:
                pos = h
                break
            servo_id, length = rx[h + 2], rx[h + 3]
            if servo_id == 0xFF:  # FF FF FF: the header starts one byte later
                pos = h + 1
                continue
            k = self._index.get(servo_id, -1)
            if length != want:
                self.length_errors += 1
                self._blame(k, f"length field {length} (a reply has {want})")
                pos = h + 1
                continue
            end = h + HEADER_BYTES + length
            if end > got:
                pos = h
                break
            if checksum(rx, h + 2, end - 1) != rx[end - 1]:
                self.crc_errors += 1
                self._blame(k, "checksum error in the reply")
                pos = h + 1
                continue
            pos = end
            if k < 0 or self.seen[k]:
                self.stray += 1  # not an answer to this request
                continue
            self._heard(k, rx[h + 4])
            self.offset[k] = h + 5
        self.pos = pos
        if self.left and got >= self.expected:  # every reply's bytes are in: the rest garbled
            for k in self.unsettled():
                self._settle(k, GARBLED_REPLY)
        return self.left == 0
