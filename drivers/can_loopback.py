"""python-can interface "duet-udp": CAN and CAN FD frames between two peers over loopback UDP.

For machines without SocketCAN/vcan (containers, CI, macOS): the follower and the sim's
emulated motors each hold one end. A channel names both ends,

    can.Bus(interface="duet-udp", channel="127.0.0.1:47011>127.0.0.1:47010")

local address first. Only literal addresses inside 127.0.0.0/8 are accepted: never a
hostname, multicast, or anything that leaves the host. The socket is `connect()`ed to its
peer, so the kernel delivers datagrams from that address and port only: another local process
cannot inject frames (a forged motor reply). Each datagram is one frame in a fixed
little-endian struct: magic "DC", version, flags (extended, remote, error, FD, bit-rate
switch, error-state indicator), length, arbitration id, sender timestamp (time.time(),
python-can's convention), 64 data bytes. Malformed datagrams are counted in `dropped` and
skipped. Bit rates are accepted and ignored: this is a pipe. Registered as a python-can entry
point in pyproject.toml.
"""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import time
from typing import Any

import can

_FRAME = struct.Struct("<2sBBBxIxxxd64s")  # magic, version, flags, length, pad, id, pad, t, data
_MAGIC = b"DC"
_VERSION = 2
_F_EXTENDED, _F_REMOTE, _F_ERROR, _F_FD, _F_BRS, _F_ESI = 1, 2, 4, 8, 16, 32
_FD_LENGTHS = frozenset((0, 1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 24, 32, 48, 64))
_LOOPBACK = ipaddress.ip_network("127.0.0.0/8")


def free_ports(n: int) -> list[int]:
    """`n` loopback UDP ports free now (the kernel's picks)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_channel() -> str:
    """A channel between two loopback ports free now, this end first: two stacks (tests side
    by side, a bench beside a demo) never share a bus, as fixed ports would make them."""
    ours, peer = free_ports(2)
    return f"127.0.0.1:{ours}>127.0.0.1:{peer}"


def parse_address(text: str) -> tuple[str, int]:
    """'127.0.0.1:47000' -> ('127.0.0.1', 47000); refuse anything outside 127.0.0.0/8."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"duet-udp address {text!r}: expected 127.x.y.z:PORT")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"duet-udp address {text!r}: {host!r} is not a literal IPv4 address"
                         " (hostnames are refused)") from None
    if addr.version != 4 or addr not in _LOOPBACK:
        raise ValueError(f"duet-udp address {text!r}: only 127.0.0.0/8 loopback is allowed")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"duet-udp address {text!r}: port must be 1..65535")
    return str(addr), port


def parse_channel(channel: str) -> tuple[tuple[str, int], tuple[str, int]]:
    """'LOCAL>REMOTE' -> (local, remote) addresses."""
    local, sep, remote = str(channel).partition(">")
    if not sep:
        raise ValueError(f"duet-udp channel {channel!r}: expected 'LOCAL_IP:PORT>REMOTE_IP:PORT'")
    return parse_address(local), parse_address(remote)


def peer_channel(channel: str) -> str:
    """The channel of the other end: 'A>B' -> 'B>A'."""
    (lh, lp), (rh, rp) = parse_channel(channel)
    return f"{rh}:{rp}>{lh}:{lp}"


class DuetUdpBus(can.BusABC):
    """One end of a point-to-point loopback CAN link."""

    def __init__(self, channel: Any, can_filters: Any = None, receive_own_messages: bool = False,
                 **kwargs: Any) -> None:
        # bitrate and other physical-layer options are accepted and ignored: this is a pipe
        self._local, self._remote = parse_channel(str(channel))
        self.receive_own_messages = receive_own_messages
        self.channel_info = f"duet-udp {self._local[0]}:{self._local[1]} -> " \
                            f"{self._remote[0]}:{self._remote[1]}"
        self.dropped = 0
        self.unheard = 0  # frames sent while the peer's end was not open (an un-acked frame)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self._local)
            self._sock.connect(self._remote)  # the kernel now drops every other sender
        except OSError as exc:
            self._sock.close()
            raise can.CanInitializationError(
                f"duet-udp: cannot bind {self._local[0]}:{self._local[1]} to its peer"
                f" {self._remote[0]}:{self._remote[1]}: {exc.strerror}"
            ) from exc
        self._sock.setblocking(False)
        self._tx = bytearray(_FRAME.size)
        self._rx = bytearray(_FRAME.size + 1)  # one spare byte exposes oversized datagrams
        self._own: list[can.Message] = []
        super().__init__(channel=channel, can_filters=can_filters, **kwargs)

    def fileno(self) -> int:
        return self._sock.fileno()

    def send(self, msg: can.Message, timeout: float | None = None) -> None:
        if msg.is_fd and (msg.dlc not in _FD_LENGTHS or msg.is_remote_frame):
            raise can.CanOperationError(f"duet-udp: a CAN FD frame carries one of"
                                        f" {sorted(_FD_LENGTHS)} bytes and is never remote")
        if not msg.is_fd and (msg.dlc > 8 or msg.bitrate_switch or msg.error_state_indicator):
            raise can.CanOperationError("duet-udp: a classic CAN frame carries <= 8 bytes and"
                                        " no FD flags")
        flags = ((_F_EXTENDED if msg.is_extended_id else 0) | (_F_REMOTE if msg.is_remote_frame
                 else 0) | (_F_ERROR if msg.is_error_frame else 0) | (_F_FD if msg.is_fd else 0)
                 | (_F_BRS if msg.bitrate_switch else 0)
                 | (_F_ESI if msg.error_state_indicator else 0))
        stamp = time.time()
        _FRAME.pack_into(self._tx, 0, _MAGIC, _VERSION, flags, msg.dlc, msg.arbitration_id,
                         stamp, bytes(msg.data[: msg.dlc]))
        try:
            self._sock.send(self._tx)
        except ConnectionRefusedError:  # the peer's end is not open: nobody heard the frame
            self.unheard += 1
        except OSError as exc:
            raise can.CanOperationError(f"duet-udp send failed: {exc.strerror}") from exc
        if self.receive_own_messages:
            self._own.append(can.Message(
                timestamp=stamp, arbitration_id=msg.arbitration_id,
                is_extended_id=msg.is_extended_id, is_remote_frame=msg.is_remote_frame,
                is_fd=msg.is_fd, bitrate_switch=msg.bitrate_switch,
                error_state_indicator=msg.error_state_indicator, dlc=msg.dlc,
                data=bytes(msg.data[: msg.dlc]), is_rx=False, channel=self.channel_info))

    def _recv_internal(self, timeout: float | None) -> tuple[can.Message | None, bool]:
        if self._own:
            return self._own.pop(0), False
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                n = self._sock.recv_into(self._rx)
            except (BlockingIOError, ConnectionRefusedError):  # refused: the peer is not open
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None, False
                ready, _, _ = select.select([self._sock], [], [], left)
                if not ready:
                    return None, False
                continue
            except OSError as exc:
                raise can.CanOperationError(f"duet-udp receive failed: {exc.strerror}") from exc
            msg = self._decode(n)
            if msg is not None:
                return msg, False
            self.dropped += 1

    def _decode(self, n: int) -> can.Message | None:
        if n != _FRAME.size:
            return None
        magic, version, flags, dlc, arb_id, stamp, data = _FRAME.unpack_from(self._rx, 0)
        extended, fd = bool(flags & _F_EXTENDED), bool(flags & _F_FD)
        if magic != _MAGIC or version != _VERSION or flags & ~63 \
                or arb_id >= (1 << (29 if extended else 11)):
            return None
        if (fd and (dlc not in _FD_LENGTHS or flags & _F_REMOTE)) \
                or (not fd and (dlc > 8 or flags & (_F_BRS | _F_ESI))):
            return None
        return can.Message(timestamp=stamp, arbitration_id=arb_id, is_extended_id=extended,
                           is_remote_frame=bool(flags & _F_REMOTE),
                           is_error_frame=bool(flags & _F_ERROR), is_fd=fd,
                           bitrate_switch=bool(flags & _F_BRS),
                           error_state_indicator=bool(flags & _F_ESI), dlc=dlc,
                           data=None if flags & _F_REMOTE else data[:dlc],
                           is_rx=True, channel=self.channel_info)

    def shutdown(self) -> None:
        super().shutdown()
        self._sock.close()
