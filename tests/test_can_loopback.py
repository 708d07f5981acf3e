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
from drivers.can_loopback import DuetUdpBus, parse_channel, peer_channel
from drivers.can_mit import MitCanBus

ROOT = Path(__file__).resolve().parents[1]


def free_ports(n: int) -> list[int]:
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


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
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        raw.sendto(b"not a frame", ("127.0.0.1", pb))
        raw.close()
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
        with pytest.raises(can.CanOperationError, match="classic CAN"):
            a.send(can.Message(arbitration_id=1, is_fd=True, data=bytes(12)))
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


def test_receive_timeout_is_honoured() -> None:
    pa, pb = free_ports(2)
    bus = can.Bus(interface="duet-udp", channel=f"127.0.0.1:{pa}>127.0.0.1:{pb}")
    try:
        t0 = time.monotonic()
        assert bus.recv(0.05) is None
        assert 0.04 <= time.monotonic() - t0 < 0.5
    finally:
        bus.shutdown()
