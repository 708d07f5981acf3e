"""Protocol 2.0 codec: CRC, stuffing, packet build/parse, streaming resync."""

from __future__ import annotations

import random

import pytest

from drivers import dynamixel_protocol as dx

# Example packets from the ROBOTIS e-manual (Protocol 2.0 page), as hex.
EMANUAL_PACKETS = [
    (dx.ping_packet(1), "ff ff fd 00 01 03 00 01 19 4e"),
    (dx.read_packet(1, 132, 4), "ff ff fd 00 01 07 00 02 84 00 04 00 1d 15"),
    (
        dx.write_packet(1, 116, (512).to_bytes(4, "little")),
        "ff ff fd 00 01 09 00 03 74 00 00 02 00 00 ca 89",
    ),
    (dx.sync_read_packet(132, 4, [1, 2]), "ff ff fd 00 fe 09 00 82 84 00 04 00 01 02 ce fa"),
    (
        dx.sync_write_packet(
            116, 4, {1: (150).to_bytes(4, "little"), 2: (170).to_bytes(4, "little")}
        ),
        "ff ff fd 00 fe 11 00 83 74 00 04 00 01 96 00 00 00 02 aa 00 00 00 82 87",
    ),
    (
        dx.status_packet(1, 0, bytes([0x06, 0x04, 0x26])),
        "ff ff fd 00 01 07 00 55 00 06 04 26 65 5d",
    ),
]


@pytest.mark.parametrize(("built", "expected"), EMANUAL_PACKETS)
def test_packets_match_emanual_examples(built: bytes, expected: str) -> None:
    assert built.hex(" ") == expected


def test_crc16_known_vectors() -> None:
    ping = bytes.fromhex("fffffd0001030001")
    assert dx.crc16(ping) == 0x4E19
    assert dx.crc16(b"123456789") == 0xFEE8  # CRC-16/BUYPASS check value
    assert dx.crc16(b"xx" + ping + b"yy", 2, 2 + len(ping)) == 0x4E19


def test_stuffing_round_trip_randomized() -> None:
    rng = random.Random(1234)
    alphabet = [0xFF, 0xFD, 0x00, 0x01]  # biased so the FF FF FD pattern is frequent
    for _ in range(500):
        payload = bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 40)))
        stuffed = dx.stuff(payload)
        assert dx.HEADER not in stuffed  # the header can never hide inside a packet
        assert dx.unstuff(stuffed) == payload
        # every FF FF FD in the stuffed payload is followed by the inserted FD
        i = stuffed.find(b"\xff\xff\xfd")
        while i >= 0:
            assert stuffed[i + 3 : i + 4] == b"\xfd"
            i = stuffed.find(b"\xff\xff\xfd", i + 4)


def test_stuffed_packet_length_and_parse() -> None:
    data = b"\xff\xff\xfd\x10"
    packet = dx.write_packet(3, 116, data)
    # length counts the stuffed bytes: instr(1) + addr(2) + data(4) + FD(1) + crc(2)
    assert packet[5] | (packet[6] << 8) == 10
    parsed = dx.parse_packet(packet)
    assert (parsed.id, parsed.instruction, parsed.params) == (3, dx.WRITE, b"\x74\x00" + data)


def test_status_error_byte() -> None:
    parsed = dx.parse_packet(dx.status_packet(5, dx.ERROR_ALERT | dx.ERR_ACCESS, b"\x01"))
    assert parsed.is_status and parsed.alert and parsed.result == dx.ERR_ACCESS
    assert parsed.params == b"\x01"
    healthy = dx.parse_packet(dx.status_packet(5, 0))
    assert not healthy.alert and healthy.result == 0 and healthy.params == b""


def test_parse_errors_are_distinct() -> None:
    good = dx.read_packet(1, 132, 4)
    with pytest.raises(dx.HeaderError):
        dx.parse_packet(b"\x00" + good[1:])
    with pytest.raises(dx.LengthError):
        dx.parse_packet(good[:-1])
    corrupt = bytearray(good)
    corrupt[9] ^= 0x01
    with pytest.raises(dx.CrcError):
        dx.parse_packet(bytes(corrupt))


def test_builders_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        dx.ping_packet(0xFD)
    with pytest.raises(ValueError):
        dx.sync_read_packet(132, 4, [1, dx.BROADCAST_ID])
    with pytest.raises(ValueError):
        dx.sync_write_packet(116, 4, {1: b"\x00\x00"})


def test_stream_parser_resyncs_after_garbage_and_split_chunks() -> None:
    rng = random.Random(7)
    packets = [
        dx.status_packet(i, 0, bytes(rng.randrange(256) for _ in range(10))) for i in range(1, 7)
    ]
    corrupt = bytearray(dx.status_packet(9, 0, b"\x01\x02"))
    corrupt[-3] ^= 0x40
    stream = (
        b"\x00\xff\xfd"
        + packets[0]
        + b"\xff\xff"
        + packets[1]
        + bytes(corrupt)
        + b"".join(packets[2:])
    )
    parser = dx.StreamParser()
    out: list[dx.Packet] = []
    pos = 0
    while pos < len(stream):  # feed in random-sized chunks, including 1-byte ones
        step = rng.randrange(1, 9)
        parser.feed(stream[pos : pos + step])
        out.extend(parser)
        pos += step
    assert [p.id for p in out] == [1, 2, 3, 4, 5, 6]
    assert [dx.status_packet(p.id, p.error, p.params) for p in out] == packets
    assert parser.crc_errors == 1
    assert parser.garbage_bytes >= 5
    assert parser.pending == 0


def test_stream_parser_rejects_absurd_length_and_recovers() -> None:
    parser = dx.StreamParser(max_length=64)
    parser.feed(b"\xff\xff\xfd\x00\x01\xff\x7f" + dx.ping_packet(2))
    assert [p.id for p in parser] == [2]
    assert parser.length_errors == 1


def test_stream_parser_keeps_partial_packet() -> None:
    packet = dx.status_packet(1, 0, b"\x10\x20")
    parser = dx.StreamParser()
    parser.feed(packet[:5])
    assert parser.next_packet() is None
    parser.feed(packet[5:])
    packet_out = parser.next_packet()
    assert packet_out is not None and packet_out.params == b"\x10\x20"


def test_decode_hardware_error() -> None:
    assert dx.decode_hardware_error(0) == []
    assert dx.decode_hardware_error(0x20) == ["overload"]
    assert dx.decode_hardware_error(0x01 | 0x04 | 0x40) == ["input voltage", "overheating", "bit 6"]


def _crc16_bitwise(data: bytes) -> int:
    crc = 0
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def test_crc16_table_matches_bitwise_definition() -> None:
    rng = random.Random(99)
    for length in range(0, 48):  # odd and even lengths, any offset
        data = bytes(rng.randrange(256) for _ in range(length + 5))
        start = rng.randrange(0, 5)
        assert dx.crc16(data, start, start + length) == _crc16_bitwise(data[start : start + length])
