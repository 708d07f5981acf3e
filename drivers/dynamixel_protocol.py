"""Dynamixel Protocol 2.0 wire codec, shared by the driver and the servo emulator.

Packet layout (all multi-byte fields little-endian):

    FF FF FD 00 | ID | LEN_L LEN_H | INSTR | PARAMS... | CRC_L CRC_H
    status:                          0x55  | ERR | PARAMS...

LEN counts everything after itself (instruction, params, CRC). Params are byte-stuffed
(FF FF FD -> FF FF FD FD) so the header never appears inside a packet; the length and the CRC
are computed over the stuffed bytes. CRC-16 is polynomial 0x8005, init 0, not reflected.
Reference: ROBOTIS e-manual, "DYNAMIXEL Protocol 2.0" and the XM430-W350 control table.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from drivers import servo_wire
from drivers.servo_wire import (
    PacketStream,
    SyncReplies,
    check_id,
    sync_read_ids,
    sync_write_params,
)

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = servo_wire.BROADCAST_ID
MAX_ID = servo_wire.MAX_ID
_STUFF_PATTERN = b"\xff\xff\xfd"
_STUFFED = b"\xff\xff\xfd\xfd"
FAMILY = "Dynamixel"  # in messages
HEADER_BYTES = 7  # header(4) + id + length(2)
STATUS_OVERHEAD = 11  # header, id, length, instruction, error, crc(2)

# Instructions
PING = 0x01
READ = 0x02
WRITE = 0x03
REBOOT = 0x08
SYNC_READ = 0x82
SYNC_WRITE = 0x83
BULK_READ = 0x92
STATUS = 0x55

# Status error byte: bit 7 = hardware-error alert, low 7 bits = result of the instruction.
ERROR_ALERT = 0x80
ERR_RESULT_FAIL = 0x01
ERR_INSTRUCTION = 0x02
ERR_CRC = 0x03
ERR_DATA_RANGE = 0x04
ERR_DATA_LENGTH = 0x05
ERR_DATA_LIMIT = 0x06
ERR_ACCESS = 0x07
RESULT_NAMES = {
    ERR_RESULT_FAIL: "result fail",
    ERR_INSTRUCTION: "instruction error",
    ERR_CRC: "CRC error",
    ERR_DATA_RANGE: "data range error",
    ERR_DATA_LENGTH: "data length error",
    ERR_DATA_LIMIT: "data limit error",
    ERR_ACCESS: "access error",
}

# X-series control table (XM430-W350). Address, and the field size in bytes where > 1.
ADDR_MODEL_NUMBER = 0  # 2 B
ADDR_FIRMWARE_VERSION = 6
ADDR_ID = 7
ADDR_BAUD_RATE = 8
ADDR_RETURN_DELAY = 9  # unit 2 µs
ADDR_DRIVE_MODE = 10
ADDR_OPERATING_MODE = 11
ADDR_PROTOCOL_TYPE = 13
ADDR_TEMPERATURE_LIMIT = 31
ADDR_MAX_VOLTAGE_LIMIT = 32  # 2 B
ADDR_MIN_VOLTAGE_LIMIT = 34  # 2 B
ADDR_PWM_LIMIT = 36  # 2 B
ADDR_CURRENT_LIMIT = 38  # 2 B
ADDR_VELOCITY_LIMIT = 44  # 4 B
ADDR_MAX_POSITION_LIMIT = 48  # 4 B
ADDR_MIN_POSITION_LIMIT = 52  # 4 B
ADDR_SHUTDOWN = 63
EEPROM_END = 64  # addresses below are EEPROM: writable only while torque is off
ADDR_TORQUE_ENABLE = 64
ADDR_LED = 65
ADDR_STATUS_RETURN_LEVEL = 68
ADDR_REGISTERED_INSTRUCTION = 69
ADDR_HARDWARE_ERROR_STATUS = 70
ADDR_VELOCITY_I_GAIN = 76  # 2 B
ADDR_VELOCITY_P_GAIN = 78  # 2 B
ADDR_POSITION_D_GAIN = 80  # 2 B
ADDR_POSITION_I_GAIN = 82  # 2 B
ADDR_POSITION_P_GAIN = 84  # 2 B
ADDR_GOAL_POSITION = 116  # 4 B
ADDR_REALTIME_TICK = 120  # 2 B
ADDR_PRESENT_PWM = 124  # 2 B
ADDR_PRESENT_CURRENT = 126  # 2 B, signed, 2.69 mA
ADDR_PRESENT_VELOCITY = 128  # 4 B, signed, 0.229 rpm
ADDR_PRESENT_POSITION = 132  # 4 B, signed, 4096 ticks/rev
ADDR_PRESENT_INPUT_VOLTAGE = 144  # 2 B, 0.1 V
ADDR_PRESENT_TEMPERATURE = 146  # 1 B, °C
CONTROL_TABLE_SIZE = 147  # through Present Temperature; indirect addresses are not modelled

OPERATING_MODE_POSITION = 3
MODEL_XM430_W350 = 1020

# X-series units (XM430-W350).
TICKS_PER_REV = 4096
TICKS_PER_RAD = TICKS_PER_REV / (2 * math.pi)
CENTER_TICKS = 2048  # = 0 rad unless a joint's zero_ticks says otherwise
VELOCITY_UNIT_RAD_S = 0.229 * 2 * math.pi / 60  # Present Velocity unit: 0.229 rpm
CURRENT_UNIT_A = 2.69e-3  # Present Current unit: 2.69 mA
# Torque per ampere: stall torque / stall current at 12 V (4.1 N·m / 2.3 A). The servo
# measures current, not torque; the datasheet's torque-current curve is close to linear.
XM430_TORQUE_CONSTANT_NM_PER_A = 4.1 / 2.3

# Hardware Error Status (70) bits.
HW_ERROR_BITS = {
    0: "input voltage",
    2: "overheating",
    3: "motor encoder",
    4: "electrical shock",
    5: "overload",
}

BAUD_RATE_VALUES = {
    0: 9_600,
    1: 57_600,
    2: 115_200,
    3: 1_000_000,
    4: 2_000_000,
    5: 3_000_000,
    6: 4_000_000,
    7: 4_500_000,
}


class PacketError(ValueError):
    """A byte sequence is not a valid Protocol 2.0 packet."""


class HeaderError(PacketError):
    """The packet does not start with FF FF FD 00."""


class LengthError(PacketError):
    """The length field disagrees with the bytes present, or is out of range."""


class CrcError(PacketError):
    """The CRC in the packet does not match its contents."""


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


CRC_TABLE = _make_crc_table()


def _make_crc_table16() -> list[int]:
    """CRC of every 16-bit word from a zero register: a 16-bit CRC register is shifted out
    completely by two bytes, so crc' = table16[crc ^ (b0 << 8 | b1)] (half the Python steps)."""
    t8 = np.array(CRC_TABLE, dtype=np.uint32)
    word = np.arange(1 << 16, dtype=np.uint32)
    crc = t8[word >> 8]
    crc = ((crc << 8) & 0xFFFF) ^ t8[((crc >> 8) ^ word) & 0xFF]
    return [int(c) for c in crc]


_CRC_TABLE16 = _make_crc_table16()


def crc16(data: bytes | bytearray | memoryview, start: int = 0, end: int | None = None) -> int:
    """CRC-16/BUYPASS (poly 0x8005) of data[start:end], without copying the slice."""
    if end is None:
        end = len(data)
    table16 = _CRC_TABLE16
    crc = 0
    stop = end - ((end - start) & 1)
    for i in range(start, stop, 2):
        crc = table16[crc ^ (data[i] << 8 | data[i + 1])]
    if stop != end:
        crc = ((crc << 8) & 0xFFFF) ^ CRC_TABLE[((crc >> 8) ^ data[stop]) & 0xFF]
    return crc


def stuff(payload: bytes | bytearray) -> bytes:
    """Insert 0xFD after every FF FF FD so the header cannot appear inside a packet."""
    return bytes(payload).replace(_STUFF_PATTERN, _STUFFED)


def unstuff(payload: bytes | bytearray) -> bytes:
    return bytes(payload).replace(_STUFFED, _STUFF_PATTERN)


def _frame(dxl_id: int, body: bytes) -> bytes:
    """Header + id + length + stuffed(body) + CRC; `body` starts with the instruction byte."""
    if _STUFF_PATTERN in body:
        body = stuff(body)
    packet = bytearray(HEADER)
    packet.append(dxl_id)
    packet += (len(body) + 2).to_bytes(2, "little")
    packet += body
    packet += crc16(packet).to_bytes(2, "little")
    return bytes(packet)


def instruction_packet(dxl_id: int, instruction: int, params: bytes = b"") -> bytes:
    check_id(dxl_id, FAMILY)
    return _frame(dxl_id, bytes((instruction,)) + params)


def status_packet(dxl_id: int, error: int, params: bytes = b"") -> bytes:
    check_id(dxl_id, FAMILY, allow_broadcast=False)
    return _frame(dxl_id, bytes((STATUS, error & 0xFF)) + params)


def ping_packet(dxl_id: int) -> bytes:
    return instruction_packet(dxl_id, PING)


def read_packet(dxl_id: int, address: int, length: int) -> bytes:
    return instruction_packet(dxl_id, READ, struct.pack("<HH", address, length))


def write_packet(dxl_id: int, address: int, data: bytes) -> bytes:
    return instruction_packet(dxl_id, WRITE, struct.pack("<H", address) + data)


def reboot_packet(dxl_id: int) -> bytes:
    return instruction_packet(dxl_id, REBOOT)


def sync_read_packet(address: int, length: int, ids: Sequence[int]) -> bytes:
    params = struct.pack("<HH", address, length) + sync_read_ids(ids, FAMILY)
    return instruction_packet(BROADCAST_ID, SYNC_READ, params)


def sync_write_packet(address: int, length: int, data: Mapping[int, bytes]) -> bytes:
    params = sync_write_params(struct.pack("<HH", address, length), length, data, FAMILY)
    return instruction_packet(BROADCAST_ID, SYNC_WRITE, params)


@dataclass(frozen=True)
class Packet:
    id: int
    instruction: int
    params: bytes
    error: int = 0  # status packets only

    @property
    def is_status(self) -> bool:
        return self.instruction == STATUS

    @property
    def alert(self) -> bool:
        return bool(self.error & ERROR_ALERT)

    @property
    def result(self) -> int:
        return self.error & 0x7F


def _decode_body(dxl_id: int, body: bytes) -> Packet:
    if not body:
        raise LengthError("packet has no instruction byte")
    if body[0] == STATUS:
        if len(body) < 2:
            raise LengthError("status packet has no error byte")
        return Packet(dxl_id, STATUS, body[2:], body[1])
    return Packet(dxl_id, body[0], body[1:])


def parse_packet(data: bytes | bytearray) -> Packet:
    """Parse exactly one packet; raise HeaderError, LengthError or CrcError."""
    if len(data) < HEADER_BYTES or data[:4] != HEADER:
        raise HeaderError(f"no FF FF FD 00 header in {bytes(data[:8]).hex(' ')}")
    length = data[5] | (data[6] << 8)
    if length < 3 or len(data) != HEADER_BYTES + length:
        raise LengthError(f"length field {length} but {len(data) - HEADER_BYTES} bytes follow it")
    end = len(data) - 2
    if crc16(data, 0, end) != data[end] | (data[end + 1] << 8):
        raise CrcError("CRC mismatch")
    return _decode_body(data[4], unstuff(data[HEADER_BYTES:end]))


class StreamParser(PacketStream):
    """Incremental parser: feed arbitrary chunks, iterate over the complete valid packets.

    Garbage before a header is skipped and counted; a bad length or CRC drops that header and
    resynchronises on the next one (stuffing guarantees a real header never hides inside a
    packet). Partial packets wait for more bytes.
    """

    def __init__(self, max_length: int = 1024) -> None:
        super().__init__(max_length)

    def next_packet(self) -> Packet | None:
        buf = self._buf
        while True:
            if not self._skip_to(HEADER):
                return None
            if len(buf) < HEADER_BYTES:
                return None
            length = buf[5] | (buf[6] << 8)
            if length < 3 or length > self.max_length:
                self.length_errors += 1
                del buf[:1]
                continue
            total = HEADER_BYTES + length
            if len(buf) < total:
                return None
            end = total - 2
            if crc16(buf, 0, end) != buf[end] | (buf[end + 1] << 8):
                self.crc_errors += 1
                del buf[:1]
                continue
            dxl_id = buf[4]
            body = unstuff(buf[HEADER_BYTES:end])
            del buf[:total]
            try:
                return _decode_body(dxl_id, body)
            except LengthError:
                self.length_errors += 1


def decode_hardware_error(bits: int) -> list[str]:
    """Names of the set Hardware Error Status bits (unknown bits as 'bit N')."""
    names = []
    for bit in range(8):
        if bits & (1 << bit):
            names.append(HW_ERROR_BITS.get(bit, f"bit {bit}"))
    return names


LOST_REPLY = "no reply (the next motor answered first)"


class SyncReplyParser(SyncReplies):
    """The status packets answering one SYNC READ, resolved motor by motor as bytes arrive.

    What makes it resynchronise at once instead of waiting out the timeout:
    - the reply length is known (`data_len` + 4, a few more when stuffed, or 4 for a bare error
      status): a header whose length field says otherwise is corrupt, not a packet to wait for;
    - stuffing keeps FF FF FD 00 out of every packet, so a header found inside a candidate's
      claimed extent proves that candidate cut short (a stray header or a flipped length);
    - servos answer in the order of the request's id list, so a valid reply from a motor
      settles every earlier motor still unheard: its reply was lost;
    - a length beyond the reply's is stuffing, so a candidate claiming more with no stuffing in
      the reply's extent lies (a flipped length bit of the last reply, nothing after it);
    - a reply's worth of bytes with no header in them is the next unsettled motor's reply,
      garbled (a hit header of the last reply).
    A corrupt candidate is blamed on the first unsettled motor, whatever its id byte says (a
    flipped id bit must not blame a motor whose reply is still to come: one fault, one motor);
    a valid reply arriving later clears the blame.
    `offset[k]` is where motor k's data starts in the receive buffer (or -1 when its reply was
    stuffed: the unstuffed data is in `unstuffed[k]`).
    """

    lost_reply = LOST_REPLY

    def __init__(self, ids: Sequence[int], data_len: int) -> None:
        super().__init__(ids, data_len)
        self._min_len, self._max_len = data_len + 4, data_len + 4 + data_len // 3 + 1
        self._reply_bytes = HEADER_BYTES + self._min_len  # an unstuffed reply, header to CRC
        self._tail = 0  # where the bytes no packet accounts for start

    def reset(self) -> None:
        super().reset()
        self._tail = 0

    def feed(self, rx: bytearray, got: int) -> bool:
        """Parse rx[pos:got]; True once every motor is settled (seen, or blamed)."""
        pos = self.pos
        while got - pos >= HEADER_BYTES:
            h = rx.find(HEADER, pos, got)
            if h < 0:
                pos = max(pos, got - 3)  # keep a possible partial header
                break
            if got - h < HEADER_BYTES:
                pos = h
                break
            length = rx[h + 5] | (rx[h + 6] << 8)
            k = self._index.get(rx[h + 4], -1)
            if length != 4 and not self._min_len <= length <= self._max_len:
                self.length_errors += 1
                self._blame_first(f"length field {length} (a reply has {self._min_len})")
                pos, self._tail = h + 1, h + self._reply_bytes
                continue
            end = h + HEADER_BYTES + length
            inner = rx.find(HEADER, h + 4, min(end + 3, got))  # a header starting inside
            if inner >= 0:  # a real packet never contains a header: this one was cut short
                self.length_errors += 1
                self._blame_first("reply cut short by the next packet")
                self._tail = pos = inner
                continue
            reply_end = h + self._reply_bytes
            if length > self._min_len and got >= reply_end \
                    and rx.find(_STUFF_PATTERN, h + HEADER_BYTES, reply_end) < 0:
                self.length_errors += 1  # the first stuffing would lie within the reply's extent
                self._blame_first(f"length field {length} (a reply has {self._min_len},"
                               " more only with stuffing)")
                pos, self._tail = h + 1, reply_end
                continue
            if end > got:
                pos = h
                break
            if crc16(rx, h, end - 2) != rx[end - 2] | (rx[end - 1] << 8):
                self.crc_errors += 1
                self._blame_first("CRC error in the reply")
                pos, self._tail = h + 1, end
                continue
            pos = self._tail = end
            if k < 0 or self.seen[k] or rx[h + 7] != STATUS:
                self.stray += 1  # not an answer to this request (a late or foreign packet)
                continue
            error = rx[h + 8]
            self._heard(k, error)
            if error & 0x7F:
                self.bad[k] = "status " + RESULT_NAMES.get(error & 0x7F, f"error {error & 0x7F}")
            elif length == self._min_len:
                self.offset[k] = h + 9
            else:
                data = unstuff(rx[h + 9 : end - 2])
                if len(data) != self.data_len:
                    self.bad[k] = "reply of the wrong length"
                self.offset[k], self.unstuffed[k] = -1, data
        while self.left and got - self._tail >= self._reply_bytes \
                and rx.find(HEADER, self._tail, got) < 0:
            self._blame_first("garbled reply (no header)")
            self._tail += self._reply_bytes
        self.pos = pos
        return self.left == 0
