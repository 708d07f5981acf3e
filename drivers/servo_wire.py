"""What the serial-servo codecs share (drivers/dynamixel_protocol.py, Protocol 2.0, and
drivers/feetech_protocol.py, FT-SCS): the id space, the sync-write payload, the incremental
stream parser's buffer and counters, and the bookkeeping that resolves one SYNC READ's replies
servo by servo. Each codec keeps its framing (header, length, CRC or checksum, stuffing) and
its scan of the bytes."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

BROADCAST_ID = 0xFE
MAX_ID = 0xFC


def check_id(servo_id: int, family: str, allow_broadcast: bool = True) -> None:
    if not (0 <= servo_id <= MAX_ID or (allow_broadcast and servo_id == BROADCAST_ID)):
        raise ValueError(f"{family} id {servo_id} out of range 0..{MAX_ID}")


def sync_read_ids(ids: Sequence[int], family: str) -> bytes:
    """The id list of a SYNC READ (servos answer in its order)."""
    for i in ids:
        check_id(i, family, allow_broadcast=False)
    return bytes(ids)


def sync_write_params(head: bytes, length: int, data: Mapping[int, bytes], family: str) -> bytes:
    """A SYNC WRITE's parameters: `head` (the address and length, encoded by the codec), then
    each servo's id and its `length` data bytes."""
    params = bytearray(head)
    for servo_id, value in data.items():
        check_id(servo_id, family, allow_broadcast=False)
        if len(value) != length:
            raise ValueError(f"sync write data for id {servo_id} has {len(value)} bytes, "
                             f"expected {length}")
        params.append(servo_id)
        params += value
    return bytes(params)


class PacketStream:
    """Incremental parser: feed arbitrary chunks, iterate over the complete valid packets
    (`next_packet`, the codec's scan). Counters: bytes skipped before a header, headers
    dropped for an impossible length or a failed CRC or checksum (`crc_errors`)."""

    def __init__(self, max_length: int) -> None:
        self.max_length = max_length
        self._buf = bytearray()
        self.crc_errors = 0
        self.length_errors = 0
        self.garbage_bytes = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        self._buf += data

    def clear(self) -> None:
        self._buf.clear()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def __iter__(self) -> Iterator[Any]:
        while (packet := self.next_packet()) is not None:
            yield packet

    def next_packet(self) -> Any:
        raise NotImplementedError

    def _skip_to(self, header: bytes) -> bool:
        """Drop the bytes before the next `header`, counted as garbage; False when the buffer
        holds none (a partial header at its end is kept for the next chunk)."""
        buf = self._buf
        start = buf.find(header)
        if start < 0:
            keep = next((n for n in range(len(header) - 1, 0, -1)
                         if buf.endswith(header[:n])), 0)
            self.garbage_bytes += len(buf) - keep
            del buf[: len(buf) - keep]
            return False
        if start:
            self.garbage_bytes += start
            del buf[:start]
        return True


class SyncReplies:
    """The status packets answering one SYNC READ, resolved servo by servo as bytes arrive
    (`feed`, the codec's scan): each servo is seen (its reply valid), or blamed (`bad[k]`
    says why), or still unsettled. Servos answer in the order of the request's id list, so a
    valid reply settles every earlier servo still unheard: its reply was lost (`lost_reply`).
    `offset[k]` is where servo k's data starts in the receive buffer (or -1 when the codec
    had to unstuff it: the data is then in `unstuffed[k]`)."""

    lost_reply: ClassVar[str]

    def __init__(self, ids: Sequence[int], data_len: int) -> None:
        self.ids = list(ids)
        self.n = len(self.ids)
        self.data_len = data_len
        self._index = {servo_id: k for k, servo_id in enumerate(self.ids)}
        self.seen = [False] * self.n
        self.bad: list[str | None] = [None] * self.n
        self.error = [0] * self.n  # status error byte of each seen reply
        self.offset = [0] * self.n
        self.unstuffed: list[bytes] = [b""] * self.n
        self.pos = 0
        self.left = self.n  # servos neither seen nor blamed
        self._first = 0  # no servo before this one is unsettled
        self.crc_errors = self.length_errors = self.stray = 0

    def reset(self) -> None:
        for k in range(self.n):
            self.seen[k] = False
            self.bad[k] = None
            self.error[k] = 0
        self.pos = self._first = 0
        self.left = self.n

    @property
    def settled(self) -> bool:
        return self.left == 0

    def unsettled(self) -> list[int]:
        return [k for k in range(self._first, self.n) if not self.seen[k] and self.bad[k] is None]

    def feed(self, rx: bytearray, got: int) -> bool:
        """Parse rx[pos:got]; True once every servo is settled (seen, or blamed)."""
        raise NotImplementedError

    def _settle(self, k: int, reason: str | None) -> None:
        """Servo k (unsettled) is seen (reason None) or blamed."""
        self.left -= 1
        if reason is None:
            self.seen[k] = True
        else:
            self.bad[k] = reason
        while self._first < self.n and (self.seen[self._first]
                                        or self.bad[self._first] is not None):
            self._first += 1

    def _blame_first(self, reason: str) -> None:
        """A corrupt candidate: the first unsettled servo's (or a stray one when none is)."""
        if self._first == self.n:
            self.stray += 1
            return
        self._settle(self._first, reason)

    def _heard(self, k: int, error: int) -> None:
        """Servo k's valid reply, with its status error byte."""
        for earlier in range(self._first, k):  # replies come in request order: lost
            if not self.seen[earlier] and self.bad[earlier] is None:
                self._settle(earlier, self.lost_reply)
        if self.bad[k] is None:
            self._settle(k, None)
        else:  # blamed for a corrupt candidate, yet its reply came: the blame was wrong
            self.seen[k], self.bad[k] = True, None
        self.error[k] = error
