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


# -- the SYNC READ reply parser: one bad reply never hides the others -------------------------

SYNC_IDS = [1, 2, 3, 4, 5, 6]


def replies(*, patch: dict[int, dict[int, int]] | None = None, drop: int | None = None,
            insert: dict[int, bytes] | None = None) -> bytearray:
    """Six status packets of 10 data bytes; patch[k][offset] = byte, drop motor k, insert
    bytes before motor k's packet."""
    stream = bytearray()
    for k, dxl_id in enumerate(SYNC_IDS):
        stream += (insert or {}).get(k, b"")
        if k == drop:
            continue
        packet = bytearray(dx.status_packet(dxl_id, 0, bytes([dxl_id] * 10)))
        for at, value in (patch or {}).get(k, {}).items():
            packet[at] = value
        stream += packet
    return stream


def parse(stream: bytearray, chunk: int = 0) -> dx.SyncReplyParser:
    parser = dx.SyncReplyParser(SYNC_IDS, 10)
    parser.reset()
    got = 0
    while got < len(stream):
        got = min(len(stream), got + chunk) if chunk else len(stream)
        if parser.feed(stream, got):
            break
    return parser


def data_of(parser: dx.SyncReplyParser, stream: bytearray, k: int) -> bytes:
    at = parser.offset[k]
    return bytes(stream[at : at + 10]) if at >= 0 else parser.unstuffed[k]


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_sync_parser_reads_every_reply_in_any_chunking(chunk: int) -> None:
    stream = replies()
    parser = parse(stream, chunk)
    assert parser.settled and parser.bad == [None] * 6
    assert [data_of(parser, stream, k) for k in range(6)] == [bytes([i] * 10) for i in SYNC_IDS]


@pytest.mark.parametrize(("patch", "reason"), [
    ({5: 0x8E}, "length field 142"),   # a flipped length bit: no reply is that long
    # plausible (a stuffed reply's length), but there is no stuffing in it
    ({5: 0x0F}, "length field 15 (a reply has 14, more only with stuffing)"),
    ({6: 0x01}, "length field 270"),
    ({12: 0x00}, "CRC error"),         # a data byte
])
def test_sync_parser_blames_only_the_corrupt_reply_and_settles_at_once(
        patch: dict[int, int], reason: str | tuple[str, ...]) -> None:
    stream = replies(patch={2: patch})
    parser = parse(stream, chunk=5)
    assert parser.settled
    assert parser.bad[2] is not None and parser.bad[2].startswith(reason)
    assert [b for k, b in enumerate(parser.bad) if k != 2] == [None] * 5
    assert data_of(parser, stream, 3) == bytes([4] * 10)


@pytest.mark.parametrize("chunk", [0, 1, 5])
def test_sync_parser_any_flipped_bit_blames_its_reply_alone_without_waiting(chunk: int) -> None:
    """Every single-bit flip (header, id, length, instruction, error, data, CRC) in any one of
    the six replies, the last included: that motor alone is blamed, every other reply is kept,
    and the parser settles on the bytes that came (no timeout). A flipped length bit of the
    last reply (0x0E -> 0x0F) waited out the timeout for a byte that never comes; a flipped
    id bit blamed the motor it named, whose reply had yet to come."""
    for k in range(6):
        for at in range(21):
            for bit in range(8):
                stream = replies()
                stream[21 * k + at] ^= 1 << bit
                parser = parse(stream, chunk)
                where = (k, at, bit, parser.bad)
                assert parser.settled, where
                assert [b for j, b in enumerate(parser.bad) if j != k] == [None] * 5, where
                assert all(data_of(parser, stream, j) == bytes([SYNC_IDS[j]] * 10)
                           for j in range(6) if j != k), where


def test_sync_parser_a_stray_header_blames_nobody() -> None:
    # a stray header (line noise that looks like one) before the elbow's reply, with a length
    # no reply has and with a plausible one: both are dropped and every motor is read
    for stray in (dx.HEADER + bytes([3, 0xFF, 0x7F]), dx.HEADER + bytes([9, 14, 0]) + b"xx"):
        stream = replies(insert={2: stray})
        parser = parse(stream, chunk=3)
        assert parser.settled and parser.bad == [None] * 6, (stray, parser.bad)
        assert data_of(parser, stream, 2) == bytes([3] * 10)


def test_sync_parser_a_lost_reply_is_settled_by_the_next_one() -> None:
    # the elbow's header was hit (its packet is garbage now): the wrist's reply settles it
    stream = replies(patch={2: {1: 0x00}})
    parser = parse(stream)
    assert parser.bad[2] == dx.LOST_REPLY and parser.settled
    assert [b for k, b in enumerate(parser.bad) if k != 2] == [None] * 5
    # ... and a silent last motor stays unsettled: only the timeout can say it
    parser = parse(replies(drop=5))
    assert not parser.settled and parser.unsettled() == [5]


def test_sync_parser_reads_stuffed_replies_and_ignores_foreign_packets() -> None:
    stuffed = dx.status_packet(3, 0, b"\xff\xff\xfd\x01\x02\x03\x04\x05\x06\x07")
    stream = replies(insert={0: dx.status_packet(9, 0, bytes(10))})  # an id not asked for
    three = stream.index(dx.status_packet(3, 0, bytes([3] * 10)))
    stream[three : three + 21] = stuffed
    parser = parse(stream)
    assert parser.settled and parser.bad == [None] * 6 and parser.stray == 1
    assert data_of(parser, stream, 2) == b"\xff\xff\xfd\x01\x02\x03\x04\x05\x06\x07"
    error = replies(patch={4: {8: dx.ERR_DATA_RANGE}})
    error[-21 * 2 + 19 : -21 * 2 + 21] = dx.crc16(error, len(error) - 42,
                                                   len(error) - 23).to_bytes(2, "little")
    parser = parse(error)
    assert parser.bad[4] == "status data range error"
