"""Wire-time budget of one follower tick: can the bus carry the configured rate?

A tick is one read of every motor plus one write of every motor. The figures are worst
cases (every CAN stuff bit, every Dynamixel byte framed as 10 bits) so a config that passes
here does not depend on lucky payloads. Each bus family (drivers/families.py) states its tick's
wire time and arithmetic from these figures; `families.check_budget` refuses a rate whose wire
time does not fit in the usable fraction of the period and shows the arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass

# Dynamixel Protocol 2.0 packet sizes in bytes (header FF FF FD 00, id, length[2],
# instruction, ..., crc[2]).
_DXL_SYNC_READ_FIXED = 14  # + 1 byte per id: addr[2] len[2] ids...
_DXL_STATUS_FIXED = 11  # + data: instruction 0x55, error, data..., crc
_DXL_SYNC_WRITE_FIXED = 14  # + (1 + data) per id
UART_BITS_PER_BYTE = 10  # start + 8 data + stop

# Feetech FT-SCS packet sizes in bytes (header FF FF, id, length, instruction, ..., checksum).
_FT_SYNC_READ_FIXED = 8  # + 1 byte per id: addr, len, ids...
_FT_STATUS_FIXED = 6  # + data: error, data..., checksum
_FT_SYNC_WRITE_FIXED = 8  # + (1 + data) per id

# CAN 2.0A (11-bit id): SOF 1, id 11, RTR 1, IDE 1, r0 1, DLC 4, data 8n, CRC 15,
# CRC delimiter 1, ACK 2, EOF 7, interframe space 3 -> 47 + 8n bits. Bit stuffing covers
# SOF..CRC (34 + 8n bits) and adds at most one bit per four after the first.
_CAN_FIXED_BITS = 47
_CAN_STUFFED_FIXED_BITS = 34

# CAN FD, base format (ISO 11898-1:2015), bit-rate switching. Arbitration phase at the
# nominal rate: SOF 1, id 11, RRS 1, IDE 1, FDF 1, res 1, BRS 1 (17 bits, dynamically
# stuffed: at most (17 - 1) // 4 stuff bits), then after the data phase CRC delimiter 1,
# ACK 2, EOF 7, interframe space 3 (13 bits). Data phase at the data rate: ESI 1, DLC 4,
# data 8n (dynamically stuffed: at most one bit per four), stuff count 4 and CRC-17 (up to
# 16 data bytes; CRC-21 above) with one fixed stuff bit before the stuff count and after
# every fourth bit (6 bits, 7 for CRC-21). The CRC delimiter is counted at the nominal rate.
_FD_ARBITRATION_BITS = 17
_FD_TAIL_BITS = 13
_FD_LENGTHS = (0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64)

DEFAULT_USABLE_FRACTION = 0.7


def can_frame_bits(dlc: int, worst_case_stuffing: bool = True) -> int:
    """Bits one standard-id classic CAN frame with `dlc` data bytes occupies on the wire."""
    if not 0 <= dlc <= 8:
        raise ValueError(f"classic CAN carries 0..8 data bytes, got dlc={dlc}")
    bits = _CAN_FIXED_BITS + 8 * dlc
    if worst_case_stuffing:
        bits += (_CAN_STUFFED_FIXED_BITS + 8 * dlc - 1) // 4
    return bits


def can_fd_frame_bits(n_bytes: int) -> tuple[int, int]:
    """(nominal-rate bits, data-rate bits) of one base-format CAN FD frame with bit-rate
    switching, worst-case stuffing."""
    if n_bytes not in _FD_LENGTHS:
        raise ValueError(f"CAN FD carries one of {_FD_LENGTHS} data bytes, got {n_bytes}")
    nominal = _FD_ARBITRATION_BITS + (_FD_ARBITRATION_BITS - 1) // 4 + _FD_TAIL_BITS
    dynamic = 5 + 8 * n_bytes  # ESI, DLC, data
    crc = 17 if n_bytes <= 16 else 21
    data = dynamic + (dynamic + 3) // 4 + 4 + crc + 1 + (4 + crc - 1) // 4
    return nominal, data


def can_frame_us(n_bytes: int, bitrate: int, fd: bool = False,
                 data_bitrate: int | None = None) -> float:
    """Wire time of one standard-id frame: classic CAN, or CAN FD with bit-rate switching."""
    if not fd:
        return can_frame_bits(n_bytes) * 1e6 / bitrate
    nominal, data = can_fd_frame_bits(n_bytes)
    return nominal * 1e6 / bitrate + data * 1e6 / (data_bitrate or bitrate)


def can_mit_tick_bits(n_motors: int, command_dlc: int = 8, reply_dlc: int = 6) -> int:
    """MIT mode, classic CAN: one command frame and one reply frame per motor per tick."""
    return n_motors * (can_frame_bits(command_dlc) + can_frame_bits(reply_dlc))


def can_mit_tick_us(bitrate: int, n_motors: int, command_dlc: int = 8, reply_dlc: int = 6,
                    fd: bool = False, data_bitrate: int | None = None) -> float:
    return n_motors * (can_frame_us(command_dlc, bitrate, fd, data_bitrate)
                       + can_frame_us(reply_dlc, bitrate, fd, data_bitrate))


@dataclass(frozen=True)
class SerialPackets:
    """A serial-servo protocol's tick on the wire: its packet sizes in bytes and the data a
    tick reads back and writes per servo."""

    sync_read_fixed: int  # + 1 byte per id
    status_fixed: int  # + the data read back
    sync_write_fixed: int  # + (1 + the data written) per id
    read_bytes: int
    write_bytes: int

    def tick_bytes(self, n_motors: int) -> int:
        """Sync Read instruction + n status packets + one Sync Write."""
        sync_read = self.sync_read_fixed + n_motors
        status = n_motors * (self.status_fixed + self.read_bytes)
        sync_write = self.sync_write_fixed + n_motors * (1 + self.write_bytes)
        return sync_read + status + sync_write

    def tick_us(self, baudrate: int, n_motors: int, return_delay_us: float = 0.0) -> float:
        wire = self.tick_bytes(n_motors) * UART_BITS_PER_BYTE * 1e6
        return wire / baudrate + n_motors * return_delay_us


# X-series present current, velocity and position (addresses 126..135, 10 bytes) read back;
# goal position (4 bytes) written
DYNAMIXEL_PACKETS = SerialPackets(_DXL_SYNC_READ_FIXED, _DXL_STATUS_FIXED, _DXL_SYNC_WRITE_FIXED,
                                  read_bytes=10, write_bytes=4)
# STS present position, speed, load, voltage and temperature (addresses 56..63, 8 bytes) read
# back; goal position (2 bytes) written
FEETECH_PACKETS = SerialPackets(_FT_SYNC_READ_FIXED, _FT_STATUS_FIXED, _FT_SYNC_WRITE_FIXED,
                                read_bytes=8, write_bytes=2)


@dataclass(frozen=True)
class Budget:
    """One tick's wire time against the follower period."""

    wire_us: float
    period_us: float
    usable_fraction: float
    arithmetic: str  # how wire_us was obtained, for messages and reports

    @property
    def usable_us(self) -> float:
        return self.period_us * self.usable_fraction

    @property
    def load(self) -> float:
        """Fraction of the period the wire is busy."""
        return self.wire_us / self.period_us

    @property
    def max_hz(self) -> float:
        """Highest follower rate this bus carries within the usable fraction."""
        return self.usable_fraction * 1e6 / self.wire_us
