"""Conformance with dynamixel-sdk, ROBOTIS's own implementation of Protocol 2.0.

1. The SDK as a client of our emulator (ping, read, write, GroupSyncRead/GroupSyncWrite).
2. Packets the SDK puts on the wire, captured from a pty, equal the ones our codec builds.
"""

from __future__ import annotations

import os
import select
import tty
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

dynamixel_sdk = pytest.importorskip("dynamixel_sdk")

from drivers import dynamixel_protocol as dx  # noqa: E402
from sim.actuators import Actuators  # noqa: E402
from sim.dynamixel_emulator import DynamixelEmulator  # noqa: E402

IDS = [1, 2, 3, 4, 5, 6]
COMM_SUCCESS = dynamixel_sdk.COMM_SUCCESS
SdkRig = tuple[Any, Any, Actuators, DynamixelEmulator]  # port, packet handler, ...
Capture = tuple[Any, Any, Callable[[], bytes]]  # port, packet handler, sent bytes


@pytest.fixture
def sdk_on_emulator() -> Iterator[SdkRig]:
    act = Actuators(6)
    act.q[:] = [0.0, 0.5, -0.5, 1.0, -1.0, 0.25]
    emu = DynamixelEmulator(act, IDS)
    port = dynamixel_sdk.PortHandler(emu.open())
    emu.start()
    assert port.openPort() and port.setBaudRate(4_000_000)
    yield port, dynamixel_sdk.PacketHandler(2.0), act, emu
    port.closePort()
    emu.stop()


def test_sdk_ping_read_write(sdk_on_emulator: SdkRig) -> None:
    port, ph, act, _ = sdk_on_emulator
    for dxl_id in IDS:
        model, result, error = ph.ping(port, dxl_id)
        assert (model, result, error) == (dx.MODEL_XM430_W350, COMM_SUCCESS, 0)
    ticks, result, error = ph.read4ByteTxRx(port, 2, dx.ADDR_PRESENT_POSITION)
    assert (result, error) == (COMM_SUCCESS, 0)
    assert ticks == round(2048 + 0.5 * dx.TICKS_PER_RAD)
    result, error = ph.write4ByteTxRx(port, 3, dx.ADDR_GOAL_POSITION, 3000)
    assert (result, error) == (COMM_SUCCESS, 0)
    assert act.goal_q[2] == pytest.approx((3000 - 2048) / dx.TICKS_PER_RAD)
    result, error = ph.write1ByteTxRx(port, 3, dx.ADDR_TORQUE_ENABLE, 1)
    assert (result, error) == (COMM_SUCCESS, 0) and act.torque_enabled[2]
    # EEPROM is locked while torque is on: the SDK sees the access error in the status
    result, error = ph.write1ByteTxRx(port, 3, dx.ADDR_OPERATING_MODE, 1)
    assert (result, error) == (COMM_SUCCESS, dx.ERR_ACCESS)
    # reading a read-only register works; writing it is refused
    result, error = ph.write1ByteTxRx(port, 3, dx.ADDR_HARDWARE_ERROR_STATUS, 0)
    assert error == dx.ERR_ACCESS
    result, error = ph.reboot(port, 3)
    assert (result, error) == (COMM_SUCCESS, 0) and not act.torque_enabled[2]


def test_sdk_hardware_alert_bit(sdk_on_emulator: SdkRig) -> None:
    port, ph, act, _ = sdk_on_emulator
    act.hw_error[4] = 0x20
    value, result, error = ph.read1ByteTxRx(port, 5, dx.ADDR_HARDWARE_ERROR_STATUS)
    assert (value, result) == (0x20, COMM_SUCCESS)
    assert error & dx.ERROR_ALERT and "Hardware error" in ph.getRxPacketError(error)


def test_sdk_group_sync_read_write(sdk_on_emulator: SdkRig) -> None:
    port, ph, act, _ = sdk_on_emulator
    reader = dynamixel_sdk.GroupSyncRead(port, ph, dx.ADDR_PRESENT_CURRENT, 10)
    for dxl_id in IDS:
        assert reader.addParam(dxl_id)
    assert reader.txRxPacket() == COMM_SUCCESS
    ticks = [reader.getData(i, dx.ADDR_PRESENT_POSITION, 4) for i in IDS]
    assert ticks == [round(2048 + q * dx.TICKS_PER_RAD) for q in act.q]

    writer = dynamixel_sdk.GroupSyncWrite(port, ph, dx.ADDR_GOAL_POSITION, 4)
    goals = [1000, 1500, 2000, 2500, 3000, 3500]
    for dxl_id, goal in zip(IDS, goals, strict=True):
        assert writer.addParam(dxl_id, list(goal.to_bytes(4, "little")))
    assert writer.txPacket() == COMM_SUCCESS
    want = (np.array(goals) - 2048) / dx.TICKS_PER_RAD
    for _ in range(2000):  # sync write has no reply: wait for the emulator to apply it
        if np.allclose(act.goal_q, want):
            break
        select.select([], [], [], 0.001)
    np.testing.assert_allclose(act.goal_q, want)


def test_sdk_group_bulk_read(sdk_on_emulator: SdkRig) -> None:
    """Issue 21 #18: BULK READ (0x92), each servo its own address and length, as outside tools
    (the Dynamixel Wizard, ROS drivers) read a `duet sim` arm: every servo answers with its own
    status packet, in request order (the emulator ignored the instruction: the SDK timed out)."""
    port, ph, act, _ = sdk_on_emulator
    act.temperature_c[3] = 47.0
    act.hw_error[5] = 0x20
    asks = {1: (dx.ADDR_PRESENT_POSITION, 4), 2: (dx.ADDR_PRESENT_CURRENT, 10),
            3: (dx.ADDR_MODEL_NUMBER, 2), 4: (dx.ADDR_PRESENT_TEMPERATURE, 1),
            6: (dx.ADDR_HARDWARE_ERROR_STATUS, 1)}
    reader = dynamixel_sdk.GroupBulkRead(port, ph)
    for dxl_id, (addr, length) in asks.items():
        assert reader.addParam(dxl_id, addr, length)
    assert reader.txRxPacket() == COMM_SUCCESS
    for dxl_id, (addr, length) in asks.items():
        assert reader.isAvailable(dxl_id, addr, length), dxl_id
    assert reader.getData(1, dx.ADDR_PRESENT_POSITION, 4) == 2048
    assert reader.getData(2, dx.ADDR_PRESENT_POSITION, 4) == round(2048 + 0.5 * dx.TICKS_PER_RAD)
    assert reader.getData(3, dx.ADDR_MODEL_NUMBER, 2) == dx.MODEL_XM430_W350
    assert reader.getData(4, dx.ADDR_PRESENT_TEMPERATURE, 1) == 47
    assert reader.getData(6, dx.ADDR_HARDWARE_ERROR_STATUS, 1) == 0x20


@pytest.fixture
def captured_sdk() -> Iterator[Capture]:
    """An SDK port on a pty slave whose master we read: what the SDK sends, byte for byte."""
    master, slave = os.openpty()
    tty.setraw(slave)
    port = dynamixel_sdk.PortHandler(os.ttyname(slave))
    assert port.openPort() and port.setBaudRate(4_000_000)
    port.setPacketTimeoutMillis(1)

    def sent() -> bytes:
        out = b""
        while select.select([master], [], [], 0.05)[0]:
            out += os.read(master, 4096)
        port.is_using = False  # a Tx-only read leaves the SDK port "busy" awaiting its reply
        return out

    yield port, dynamixel_sdk.PacketHandler(2.0), sent
    port.closePort()
    os.close(master)
    os.close(slave)


def test_sdk_packets_equal_ours(captured_sdk: Capture) -> None:
    port, ph, sent = captured_sdk
    ph.readTx(port, 7, dx.ADDR_PRESENT_POSITION, 4)
    assert sent() == dx.read_packet(7, dx.ADDR_PRESENT_POSITION, 4)
    ph.write4ByteTxOnly(port, 2, dx.ADDR_GOAL_POSITION, 3071)
    assert sent() == dx.write_packet(2, dx.ADDR_GOAL_POSITION, (3071).to_bytes(4, "little"))

    reader = dynamixel_sdk.GroupSyncRead(port, ph, dx.ADDR_PRESENT_CURRENT, 10)
    for dxl_id in IDS:
        reader.addParam(dxl_id)
    reader.txPacket()
    assert sent() == dx.sync_read_packet(dx.ADDR_PRESENT_CURRENT, 10, IDS)

    writer = dynamixel_sdk.GroupSyncWrite(port, ph, dx.ADDR_GOAL_POSITION, 4)
    goals = {dxl_id: (2048 + 100 * dxl_id).to_bytes(4, "little") for dxl_id in IDS}
    for dxl_id, data in goals.items():
        writer.addParam(dxl_id, list(data))
    writer.txPacket()
    assert sent() == dx.sync_write_packet(dx.ADDR_GOAL_POSITION, 4, goals)


@pytest.mark.parametrize("dxl_id", [1, 0x42])
def test_sdk_ping_and_reboot_packets_equal_ours(captured_sdk: Capture, dxl_id: int) -> None:
    port, ph, sent = captured_sdk
    ph.ping(port, dxl_id)  # no one answers: the SDK times out after sending
    assert sent() == dx.ping_packet(dxl_id)
    ph.reboot(port, dxl_id)
    assert sent() == dx.reboot_packet(dxl_id)


def test_sdk_stuffing_equals_ours() -> None:
    # The SDK's txPacket cannot be captured here: its addStuffing returns a new list when a
    # packet grows, which txPacket discards (dynamixel-sdk 4.1), so it sends the packet
    # unstuffed. Compare against the SDK's stuffing and CRC functions directly.
    ph = dynamixel_sdk.PacketHandler(2.0)
    data = [0xFF, 0xFF, 0xFD, 0x42]
    params = [dx.ADDR_GOAL_POSITION, 0x00, *data]
    raw = [0xFF, 0xFF, 0xFD, 0x00, 2, len(params) + 3, 0x00, dx.WRITE, *params, 0, 0]
    stuffed = ph.addStuffing(raw)
    crc = ph.updateCRC(0, stuffed, len(stuffed) - 2)
    sdk_packet = bytes(stuffed[:-2]) + crc.to_bytes(2, "little")
    assert sdk_packet == dx.write_packet(2, dx.ADDR_GOAL_POSITION, bytes(data))
    assert dx.parse_packet(sdk_packet).params == bytes(params)
