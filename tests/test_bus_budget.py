"""Wire-time arithmetic of one follower tick and the refusal of rates a bus cannot carry."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from drivers.bus_budget import (
    DYNAMIXEL_PACKETS,
    FEETECH_PACKETS,
    can_fd_frame_bits,
    can_frame_bits,
    can_frame_us,
    can_mit_tick_us,
)
from drivers.families import check_budget, tick_budget

CAN_1M = SimpleNamespace(kind="mit_can", bitrate=1_000_000)
DXL_4M = SimpleNamespace(kind="dynamixel", baudrate=4_000_000, return_delay_us=0.0)


def test_can_frame_bits_standard_id() -> None:
    assert can_frame_bits(8, worst_case_stuffing=False) == 111
    assert can_frame_bits(8) == 111 + 24  # stuffing: (34 + 64 - 1) // 4
    assert can_frame_bits(6) == 95 + 20
    assert can_frame_bits(0) == 47 + 8
    with pytest.raises(ValueError, match=r"0\.\.8"):
        can_frame_bits(9)


def test_can_mit_tick() -> None:
    assert can_mit_tick_us(1_000_000, 6) == pytest.approx(6 * (135 + 115))
    assert can_mit_tick_us(500_000, 1) == pytest.approx(500.0)


def test_dynamixel_tick_bytes_and_time() -> None:
    # sync read 14 + 6 ids; 6 status packets of 11 + 10; sync write 14 + 6 x (1 + 4)
    assert DYNAMIXEL_PACKETS.tick_bytes(6) == 20 + 126 + 44
    assert DYNAMIXEL_PACKETS.tick_us(4_000_000, 6) == pytest.approx(190 * 10 / 4.0)
    assert DYNAMIXEL_PACKETS.tick_us(1_000_000, 6, 20.0) == pytest.approx(1900 + 120)


def test_feetech_tick_bytes_and_time() -> None:
    # sync read 8 + 6 ids; 6 status packets of 6 + 8 (position, speed, load, voltage,
    # temperature); sync write 8 + 6 x (1 + 2): the SO-101's six STS3215 at 1 Mbit/s
    assert FEETECH_PACKETS.tick_bytes(6) == 14 + 84 + 26
    assert FEETECH_PACKETS.tick_us(1_000_000, 6) == pytest.approx(1240.0)
    ft_1m = SimpleNamespace(kind="feetech", baudrate=1_000_000, return_delay_us=0.0)
    b = check_budget(ft_1m, 6, 500)
    assert (b.wire_us, int(b.max_hz)) == (pytest.approx(1240.0), 564)
    # the factory return delay (250 x 2 us per servo) does not fit 250 Hz
    factory = SimpleNamespace(kind="feetech", baudrate=1_000_000, return_delay_us=500.0)
    with pytest.raises(ValueError, match=r"124 bytes x 10 bits \+ 6 x 500 us.*4240.0 us"):
        check_budget(factory, 6, 250)


def test_budget_figures() -> None:
    b = check_budget(CAN_1M, 6, 400)
    assert (b.wire_us, b.period_us, b.usable_us) == pytest.approx((1500.0, 2500.0, 1750.0))
    assert b.load == pytest.approx(0.6)
    assert int(b.max_hz) == 466
    assert check_budget(DXL_4M, 6, 1000).wire_us == pytest.approx(475.0)


def test_refusal_shows_the_arithmetic() -> None:
    with pytest.raises(ValueError) as err:
        check_budget(CAN_1M, 6, 500)
    msg = str(err.value)
    for part in ("follower.hz=500", "6 motors x (135 command + 115 reply bits", "1500.0 us",
                 "2000.0 us", "0.7", "1400.0 us", "at most 466 Hz"):
        assert part in msg, part
    slow = SimpleNamespace(kind="dynamixel", baudrate=57_600, return_delay_us=250.0)
    with pytest.raises(ValueError, match=r"57600 baud.*190 bytes x 10 bits.*6 x 250 us"):
        check_budget(slow, 6, 100)


def test_fraction_and_bad_inputs() -> None:
    assert tick_budget(CAN_1M, 6, 500, usable_fraction=0.8).wire_us == pytest.approx(1500.0)
    check_budget(CAN_1M, 6, 500, usable_fraction=0.8)  # 1500 <= 1600
    with pytest.raises(ValueError, match="unknown bus kind"):
        check_budget(SimpleNamespace(kind="ethercat"), 6, 500)
    with pytest.raises(ValueError, match="usable fraction"):
        check_budget(CAN_1M, 6, 500, usable_fraction=1.5)
    with pytest.raises(ValueError, match="> 0 Hz"):
        check_budget(CAN_1M, 6, 0)


def test_can_fd_frame_arithmetic() -> None:
    # 8 data bytes: nominal = 17 arbitration + 4 stuff + 13 tail = 34 bits; data = ESI, DLC and
    # 64 data bits (69) + 18 stuff + 4 stuff count + 17 CRC + 6 fixed stuff = 114 bits
    assert can_fd_frame_bits(8) == (34, 114)
    assert can_fd_frame_bits(0) == (34, 5 + 2 + 4 + 17 + 6)
    assert can_fd_frame_bits(64) == (34, 517 + 130 + 4 + 21 + 7)  # CRC-21 above 16 bytes
    with pytest.raises(ValueError, match="CAN FD carries one of"):
        can_fd_frame_bits(9)
    assert can_frame_us(8, 1_000_000, fd=True, data_bitrate=5_000_000) == pytest.approx(56.8)
    assert can_frame_us(8, 1_000_000) == pytest.approx(135.0)  # classic
    # FD without a faster data phase is longer than classic (more header, CRC-17)
    assert can_frame_us(8, 1_000_000, fd=True, data_bitrate=1_000_000) > 135.0


def test_fd_budget_and_dialect_reply_length() -> None:
    damiao = SimpleNamespace(kind="mit_can", bitrate=1_000_000, dialect="damiao")
    b = tick_budget(damiao, 6, 400)
    assert b.wire_us == pytest.approx(6 * (135 + 135))  # Damiao replies carry 8 bytes
    fd = SimpleNamespace(kind="mit_can", bitrate=1_000_000, dialect="damiao", fd=True,
                         data_bitrate=5_000_000)
    b = check_budget(fd, 6, 1000)  # 6 x 2 x 56.8 = 681.6 us <= 700 us
    assert b.wire_us == pytest.approx(681.6)
    assert "FD at 1000000/5000000 bit/s" in b.arithmetic and "114" in b.arithmetic
    with pytest.raises(ValueError, match=r"681\.6 us > 560\.0 us.*at most 1026 Hz"):
        check_budget(fd, 6, 1250)
