"""The duet-udp python-can interface: address policy, framing, and two real processes."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import can
import numpy as np
import pytest

from drivers.bus import MotorState
from drivers.can_loopback import DuetUdpBus, free_ports, parse_channel, peer_channel
from drivers.can_mit import MitCanBus

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("channel", "reason"),
    [
        ("10.0.0.1:4000>127.0.0.1:4001", "only 127.0.0.0/8"),
        ("127.0.0.1:4000>224.0.0.1:4001", "only 127.0.0.0/8"),  # multicast
        ("127.0.0.1:4000>0.0.0.0:4001", "only 127.0.0.0/8"),
        ("127.0.0.1:4000>[::1]:4001", "not a literal IPv4"),
        ("localhost:4000>127.0.0.1:4001", "hostnames are refused"),
        ("127.0.0.1:4000", "expected 'LOCAL_IP:PORT>REMOTE_IP:PORT'"),
        ("127.0.0.1:70000>127.0.0.1:4001", "port must be"),
        ("127.0.0.1:x>127.0.0.1:4001", "expected 127"),
    ],
)
def test_non_loopback_or_malformed_channels_are_refused(channel: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        can.Bus(interface="duet-udp", channel=channel)


def test_peer_channel_swaps_ends() -> None:
    assert peer_channel("127.0.0.1:1000>127.0.0.2:2000") == "127.0.0.2:2000>127.0.0.1:1000"
    assert parse_channel("127.0.0.1:1000>127.0.0.2:2000") == (("127.0.0.1", 1000),
                                                               ("127.0.0.2", 2000))


def test_frames_cross_in_process_with_all_fields_and_garbage_is_dropped() -> None:
    pa, pb = free_ports(2)
    a = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pa}>127.0.0.1:{pb}", bitrate=1_000_000)
    b = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pb}>127.0.0.1:{pa}")
    assert isinstance(a, DuetUdpBus)
    try:
        assert b.recv(0.0) is None
        a._sock.send(b"not a frame")  # type: ignore[attr-defined]  # garbage from the peer
        a.send(can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b"\x01\x02\x03"))
        a.send(can.Message(arbitration_id=0x1ABCDEF0, is_extended_id=True, data=bytes(range(8))))
        a.send(can.Message(arbitration_id=0x10, is_extended_id=False, is_remote_frame=True, dlc=2))
        m1, m2, m3 = (b.recv(1.0) for _ in range(3))
        assert m1 is not None and m2 is not None and m3 is not None
        assert (m1.arbitration_id, m1.is_extended_id, bytes(m1.data), m1.dlc) == (
            0x7FF, False, b"\x01\x02\x03", 3)
        assert (m2.arbitration_id, m2.is_extended_id, bytes(m2.data)) == (
            0x1ABCDEF0, True, bytes(range(8)))
        assert m3.is_remote_frame and m3.dlc == 2 and not m3.data
        assert b.dropped == 1  # type: ignore[attr-defined]
        a.send(can.Message(arbitration_id=0x123, is_extended_id=False, is_fd=True,
                           bitrate_switch=True, data=bytes(range(64))))
        fd = b.recv(1.0)
        assert fd is not None and fd.is_fd and fd.bitrate_switch and not fd.error_state_indicator
        assert (fd.arbitration_id, fd.dlc, bytes(fd.data)) == (0x123, 64, bytes(range(64)))
        with pytest.raises(can.CanOperationError, match="classic CAN frame carries <= 8"):
            a.send(can.Message(arbitration_id=1, data=bytes(8), bitrate_switch=True))
        with pytest.raises(can.CanOperationError, match="CAN FD frame carries one of"):
            a.send(can.Message(arbitration_id=1, is_fd=True, data=bytes(9), check=False))
    finally:
        a.shutdown()
        b.shutdown()


_ECHO = textwrap.dedent(
    """
    import sys, can
    bus = can.Bus(interface="duet-udp", channel=sys.argv[1])
    print("ready", flush=True)
    while True:
        msg = bus.recv(5.0)
        if msg is None or msg.arbitration_id == 0x7FF:
            break
        bus.send(can.Message(arbitration_id=msg.arbitration_id + 1, is_extended_id=False,
                             data=bytes(reversed(msg.data))))
    bus.shutdown()
    """
)


@pytest.mark.system
def test_two_processes_exchange_frames() -> None:
    pa, pb = free_ports(2)
    peer = subprocess.Popen([sys.executable, "-c", _ECHO, f"127.0.0.1:{pb}>127.0.0.1:{pa}"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT)
    bus = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pa}>127.0.0.1:{pb}")
    try:
        assert peer.stdout is not None and peer.stdout.readline().strip() == "ready"
        for k in range(20):
            bus.send(can.Message(arbitration_id=k, is_extended_id=False, data=bytes([k, 1, 2])))
            reply = bus.recv(2.0)
            assert reply is not None
            assert reply.arbitration_id == k + 1 and bytes(reply.data) == bytes([2, 1, k])
        bus.send(can.Message(arbitration_id=0x7FF, is_extended_id=False, data=b""))
        assert peer.wait(timeout=10) == 0
    finally:
        bus.shutdown()
        if peer.poll() is None:
            peer.kill()
            peer.wait()


_EMULATOR = textwrap.dedent(
    """
    import sys, time, can
    from sim.actuators import Actuators
    from sim.can_emulator import MitCanEmulator
    from drivers.can_mit import MitRanges
    act = Actuators(3)
    act.q[:] = [0.5, -0.25, 1.0]
    emu = MitCanEmulator(act, [1, 2, 3], MitRanges(12.5, 30.0, 10.0),
                         can.Bus(interface="duet-udp", channel=sys.argv[1]))
    emu.start()
    print("ready", flush=True)
    sys.stdin.readline()  # until the test closes stdin
    with act.lock:
        print(" ".join(f"{x:.4f}" for x in act.goal_q), int(act.torque_enabled.sum()), flush=True)
    emu.stop()
    """
)


@pytest.mark.system
def test_mit_bus_drives_emulator_in_another_process() -> None:
    pa, pb = free_ports(2)
    channel = f"127.0.0.1:{pa}>127.0.0.1:{pb}"
    sim = subprocess.Popen([sys.executable, "-c", _EMULATOR, peer_channel(channel)],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    bus = MitCanBus(["a", "b", "c"], [1, 2, 3], _Model(), [10.0] * 3, [0.5] * 3,
                    interface="duet-udp", channel=channel, timeout_ms=500)
    try:
        assert sim.stdout is not None and sim.stdout.readline().strip() == "ready"
        bus.open()
        out = MotorState(3)
        bus.read(out)
        np.testing.assert_allclose(out.q, [0.5, -0.25, 1.0], atol=1e-3)
        bus.enable_torque(True)
        for _ in range(10):
            bus.write(np.array([0.1, 0.2, 0.3]))
            bus.read(out)
        assert bus.stats.errors == 0 and bus.stats.missing_replies == 0
        stdout, _ = sim.communicate("\n", timeout=10)
        goals, enabled = stdout.split()[:3], stdout.split()[3]
        np.testing.assert_allclose([float(g) for g in goals], [0.1, 0.2, 0.3], atol=1e-3)
        assert enabled == "3"
    finally:
        bus.close()
        if sim.poll() is None:
            sim.kill()
            sim.wait()


class _Model:
    """A duck-typed motor model, as runtime.config.MitMotorModel is to the driver."""

    p_max, v_max, t_max, kp_max, kd_max = 12.5, 30.0, 10.0, 500.0, 5.0


def test_datagrams_from_any_other_sender_are_never_received() -> None:
    """A local process that forges a motor reply (valid framing, right port) is not heard: the
    socket is connected to its peer, so the kernel drops every other source."""
    pa, pb = free_ports(2)
    bus = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pa}>127.0.0.1:{pb}")
    peer = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pb}>127.0.0.1:{pa}")
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other_ip = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # a well-formed frame, captured from the real peer's socket format
        probe = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{free_ports(1)[0]}>127.0.0.1:1")
        probe._tx[:] = bytes(len(probe._tx))  # type: ignore[attr-defined]
        msg = can.Message(arbitration_id=0, is_extended_id=False, data=bytes([1, 0xFF, 0xFF]))
        probe.send(msg)  # fills probe._tx with the frame bytes (nobody listens on port 1)
        forged = bytes(probe._tx)  # type: ignore[attr-defined]
        probe.shutdown()
        forger.sendto(forged, ("127.0.0.1", pa))  # another port on the peer's address
        other_ip.bind(("127.0.0.2", 0))
        other_ip.sendto(forged, ("127.0.0.1", pa))  # another loopback address
        assert bus.recv(0.2) is None
        assert bus.dropped == 0  # type: ignore[attr-defined]  # never even reached the bus
        peer.send(msg)
        got = bus.recv(1.0)
        assert got is not None and bytes(got.data) == bytes([1, 0xFF, 0xFF])
        assert bus.recv(0.05) is None
    finally:
        forger.close()
        other_ip.close()
        bus.shutdown()
        peer.shutdown()


def test_receive_timeout_is_honoured() -> None:
    pa, pb = free_ports(2)
    bus = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pa}>127.0.0.1:{pb}")
    try:
        t0 = time.monotonic()
        assert bus.recv(0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 0.5
    finally:
        bus.shutdown()
