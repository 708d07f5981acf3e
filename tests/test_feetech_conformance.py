"""Conformance with Feetech's own Python SDK (`ftservo-python-sdk`, module scservo_sdk).

1. Instruction packets the SDK puts on a pty, byte for byte, equal the ones our codec builds
   (ping, read, write, reg write, action, sync read, sync write; random ids, addresses, data).
2. Status packets our codec builds are what the SDK's receiver accepts, field for field.
3. The SDK as a client of our emulator: ping, reads (sign-magnitude decoded by the SDK's own
   helpers), writes, the EEPROM lock, REG_WRITE + ACTION, GroupSyncRead/GroupSyncWrite, the
   status error bits, and a corrupted reply that both the SDK and our driver resync past,
   keeping the other servos' replies.
4. The register addresses, baud rate table, error bits and sign-magnitude helpers of the SDK
   equal ours (STS/SMS and SCS series).
"""

from __future__ import annotations

import os
import random
import select
import time
import tty
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

scs = pytest.importorskip("scservo_sdk")

from drivers import feetech_protocol as ft  # noqa: E402
from drivers.bus import BusError, MotorState  # noqa: E402
from drivers.feetech import FeetechBus  # noqa: E402
from sim.actuators import HW_OVERLOAD, Actuators  # noqa: E402
from sim.feetech_emulator import FeetechEmulator  # noqa: E402

IDS = [1, 2, 3, 4, 5, 6]
FRAMES = 200  # random frames per instruction kind
OK = scs.COMM_SUCCESS
SdkRig = tuple[Any, Any, Actuators, FeetechEmulator]  # port, packet handler, ...
Capture = tuple[Any, Any, Callable[[int], bytes]]  # port, packet handler, sent bytes


def _ticks(q: float) -> int:
    return round(2048 + q * ft.STS3215.ticks_per_rad)


@pytest.fixture
def sdk_on_emulator() -> Iterator[SdkRig]:
    act = Actuators(6)
    act.q[:] = [0.0, 0.5, -0.5, 1.0, -1.0, 0.25]
    act.dq[:] = [0.0, 1.0, -1.0, 0.5, -0.5, 0.0]
    act.tau[:] = [0.0, 0.5, -0.5, 1.0, -1.0, 0.1]
    emu = FeetechEmulator(act, IDS)
    port = scs.PortHandler(emu.open())
    emu.start()
    assert port.openPort() and port.setBaudRate(1_000_000)
    yield port, scs.sms_sts(port), act, emu
    port.closePort()
    emu.stop()


def test_sdk_ping_read_write_lock(sdk_on_emulator: SdkRig) -> None:
    _port, ph, act, _ = sdk_on_emulator
    for servo_id in IDS:
        assert ph.ping(servo_id) == (ft.STS3215.model_number, OK, 0)
    pos, result, error = ph.ReadPos(3)  # the SDK decodes sign-magnitude itself
    assert (pos, result, error) == (_ticks(-0.5), OK, 0)
    pos, speed, result, error = ph.ReadPosSpeed(3)
    assert (pos, speed, result) == (_ticks(-0.5), round(-1.0 * ft.STS3215.ticks_per_rad), OK)
    load, result, _ = ph.read2ByteTxRx(5, ft.ADDR_PRESENT_LOAD)
    assert ph.scs_tohost(load, ft.SIGN_BIT_LOAD) == -round(1000 / ft.STS3215.stall_torque_nm)
    volt, result, _ = ph.read1ByteTxRx(5, ft.ADDR_PRESENT_VOLTAGE)
    assert (volt, result) == (74, OK)

    assert ph.write1ByteTxRx(3, ft.ADDR_TORQUE_ENABLE, 1) == (OK, 0) and act.torque_enabled[2]
    assert ph.WritePosEx(3, 3000, 0, 0) == (OK, 0)  # acc, goal position, time, speed
    assert act.goal_q[2] == pytest.approx((3000 - 2048) / ft.STS3215.ticks_per_rad)
    # EEPROM is locked out of the box: Mode stays, until the SDK unlocks it
    assert ph.write1ByteTxRx(3, ft.ADDR_MODE, 1) == (OK, 0)
    assert ph.read1ByteTxRx(3, ft.ADDR_MODE)[0] == 0
    assert ph.unLockEprom(3) == (OK, 0)
    assert ph.WheelMode(3) == (OK, 0)
    assert ph.read1ByteTxRx(3, ft.ADDR_MODE)[0] == 1
    assert ph.LockEprom(3) == (OK, 0)
    assert ph.write1ByteTxRx(3, ft.ADDR_MODE, 0) == (OK, 0)
    assert ph.read1ByteTxRx(3, ft.ADDR_MODE)[0] == 1


def test_sdk_reg_write_waits_for_action(sdk_on_emulator: SdkRig) -> None:
    _port, ph, act, _ = sdk_on_emulator
    before = act.goal_q[1]
    assert ph.RegWritePosEx(2, 1000, 0, 0) == (OK, 0)
    assert act.goal_q[1] == before  # staged, not applied
    assert ph.RegAction() == OK  # broadcast ACTION: no reply
    want = (1000 - 2048) / ft.STS3215.ticks_per_rad
    deadline = time.monotonic() + 2.0
    while act.goal_q[1] != pytest.approx(want) and time.monotonic() < deadline:
        select.select([], [], [], 0.001)
    assert act.goal_q[1] == pytest.approx(want)


def test_sdk_sees_the_status_error_bits(sdk_on_emulator: SdkRig) -> None:
    _port, ph, act, _ = sdk_on_emulator
    act.hw_error[4] = HW_OVERLOAD
    _value, result, error = ph.read1ByteTxRx(5, ft.ADDR_PRESENT_TEMPERATURE)
    assert (result, error) == (OK, ft.ERR_OVERLOAD)
    assert ph.getRxPacketError(error) == "[ServoStatus] Overload error!"
    # overload is in the Unloading Condition: the servo drops torque and keeps it off
    assert ph.write1ByteTxRx(5, ft.ADDR_TORQUE_ENABLE, 1) == (OK, ft.ERR_OVERLOAD)
    assert ph.read1ByteTxRx(5, ft.ADDR_TORQUE_ENABLE)[0] == 0 and not act.torque_enabled[4]


def test_sdk_group_sync_read_write(sdk_on_emulator: SdkRig) -> None:
    _port, ph, act, _ = sdk_on_emulator
    reader = scs.GroupSyncRead(ph, ft.ADDR_PRESENT_POSITION, 8)
    for servo_id in IDS:
        assert reader.addParam(servo_id)
    assert reader.txRxPacket() == OK
    for servo_id, q, dq in zip(IDS, act.q, act.dq, strict=True):
        assert reader.isAvailable(servo_id, ft.ADDR_PRESENT_POSITION, 2) == (True, 0)
        pos = reader.getData(servo_id, ft.ADDR_PRESENT_POSITION, 2)
        speed = reader.getData(servo_id, ft.ADDR_PRESENT_SPEED, 2)
        assert ph.scs_tohost(pos, 15) == _ticks(q)
        assert ph.scs_tohost(speed, 15) == round(dq * ft.STS3215.ticks_per_rad)

    writer = scs.GroupSyncWrite(ph, ft.ADDR_GOAL_POSITION, 2)
    goals = [1000, 1500, 2000, 2500, 3000, 3500]
    for servo_id, goal in zip(IDS, goals, strict=True):
        assert writer.addParam(servo_id, [ph.scs_lobyte(goal), ph.scs_hibyte(goal)])
    assert writer.txPacket() == OK
    want = (np.array(goals) - 2048) / ft.STS3215.ticks_per_rad
    deadline = time.monotonic() + 2.0
    while not np.allclose(act.goal_q, want) and time.monotonic() < deadline:
        select.select([], [], [], 0.001)
    np.testing.assert_allclose(act.goal_q, want)


@pytest.mark.parametrize("byte", [0, 1, 2, 3, 4, 7, 13])  # header, id, length, error, data, sum
def test_a_corrupt_reply_is_resynced_by_the_sdk_and_by_us(sdk_on_emulator: SdkRig,
                                                          byte: int) -> None:
    """Servo 3's reply has one byte flipped: the SDK and our driver both lose servo 3 only."""
    _port, ph, act, emu = sdk_on_emulator
    bus = FeetechBus(emu.path, 1_000_000, IDS, [f"j{i}" for i in IDS], timeout_ms=200.0,
                     retries=0)
    bus.open()
    emu.corrupt_probability, emu.corrupt_byte = 1.0, byte
    emu.corrupt_servos = frozenset({2})
    reader = scs.GroupSyncRead(ph, ft.ADDR_PRESENT_POSITION, 8)
    for servo_id in IDS:
        reader.addParam(servo_id)
    reader.txRxPacket()
    sdk_ok = {i for i in IDS if reader.isAvailable(i, ft.ADDR_PRESENT_POSITION, 2)[0]}
    assert sdk_ok == {1, 2, 4, 5, 6}
    for servo_id in sdk_ok:
        pos = reader.getData(servo_id, ft.ADDR_PRESENT_POSITION, 2)
        assert ph.scs_tohost(pos, 15) == _ticks(act.q[servo_id - 1])
    try:
        t0 = time.monotonic()
        with pytest.raises(BusError) as err:
            bus.read(MotorState(6))
        # at once, not after the 200 ms timeout: the other replies settle servo 3
        assert time.monotonic() - t0 < 0.1
        assert err.value.motor == "j3" and "id 3" in str(err.value)
        assert all(f"(id {i})" not in str(err.value) for i in (1, 2, 4, 5, 6))
        assert bus.stats.per_motor_errors == {"j1": 0, "j2": 0, "j3": 1, "j4": 0, "j5": 0,
                                              "j6": 0}
        emu.corrupt_probability = 0.0
        state = MotorState(6)
        bus.read(state)
        np.testing.assert_allclose(state.q, act.q, atol=1.0 / ft.STS3215.ticks_per_rad)
    finally:
        bus.close()


# ---- the SDK's transmitter, captured -------------------------------------------------------


@pytest.fixture
def captured_sdk() -> Iterator[Capture]:
    """An SDK port on a pty slave whose master we read: what the SDK sends, byte for byte."""
    master, slave = os.openpty()
    tty.setraw(slave)
    port = scs.PortHandler(os.ttyname(slave))
    assert port.openPort() and port.setBaudRate(1_000_000)

    def sent(n: int) -> bytes:
        """The next n bytes the SDK wrote, and nothing more."""
        out = b""
        deadline = time.monotonic() + 2.0
        while len(out) < n and select.select([master], [], [], deadline - time.monotonic())[0]:
            out += os.read(master, n - len(out))
        assert not select.select([master], [], [], 0)[0], "the SDK sent more than expected"
        port.is_using = False  # a Tx-only call leaves the SDK port "busy" awaiting its reply
        return out

    yield port, scs.sms_sts(port), sent
    port.closePort()
    os.close(master)
    os.close(slave)


def _expect(sent: Callable[[int], bytes], ours: bytes) -> None:
    assert sent(len(ours)) == ours


def test_sdk_instruction_packets_equal_ours(captured_sdk: Capture) -> None:
    _port, ph, sent = captured_sdk
    rng = random.Random(20)
    matched = 0
    for _ in range(FRAMES):
        servo_id, addr = rng.randrange(0, ft.MAX_ID + 1), rng.randrange(0, 70)
        length = rng.randrange(1, 8)
        data = bytes(rng.randrange(256) for _ in range(length))
        ph.readTx(servo_id, addr, length)
        _expect(sent, ft.read_packet(servo_id, addr, length))
        ph.writeTxOnly(servo_id, addr, length, list(data))
        _expect(sent, ft.write_packet(servo_id, addr, data))
        ph.regWriteTxOnly(servo_id, addr, length, list(data))
        _expect(sent, ft.reg_write_packet(servo_id, addr, data))

        ids = rng.sample(range(ft.MAX_ID + 1), rng.randrange(1, 12))
        reader = scs.GroupSyncRead(ph, addr, length)
        for i in ids:
            reader.addParam(i)
        reader.txPacket()
        _expect(sent, ft.sync_read_packet(addr, length, ids))
        goals = {i: bytes(rng.randrange(256) for _ in range(length)) for i in ids}
        writer = scs.GroupSyncWrite(ph, addr, length)
        for i, value in goals.items():
            writer.addParam(i, list(value))
        writer.txPacket()
        _expect(sent, ft.sync_write_packet(addr, length, goals))
        matched += 5
    ph.action(ft.BROADCAST_ID)
    _expect(sent, ft.action_packet())
    assert matched == 5 * FRAMES


def test_sdk_ping_packet_equals_ours(captured_sdk: Capture) -> None:
    _port, ph, sent = captured_sdk
    for servo_id in (1, 0x42, ft.MAX_ID):
        ph.ping(servo_id)  # no one answers: the SDK times out after sending
        _expect(sent, ft.ping_packet(servo_id))


def test_sdk_receiver_accepts_our_status_packets() -> None:
    """Our status packets through the SDK's own receiver (rxPacket), random ids and data."""
    master, slave = os.openpty()
    tty.setraw(slave)
    port = scs.PortHandler(os.ttyname(slave))
    assert port.openPort()
    ph = scs.sms_sts(port)
    rng = random.Random(21)
    try:
        for _ in range(FRAMES):
            servo_id = rng.randrange(0, ft.MAX_ID + 1)
            error = rng.choice([0, ft.ERR_VOLTAGE, ft.ERR_OVERLOAD | ft.ERR_OVERHEAT, 0x2F])
            params = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 20)))
            ours = ft.status_packet(servo_id, error, params)
            os.write(master, ours)
            port.setPacketTimeout(len(ours))
            rx, result = ph.rxPacket()
            assert result == OK
            assert bytes(rx) == ours
            assert ft.parse_packet(bytes(rx)) == ft.Packet(servo_id, error, params)
    finally:
        port.closePort()
        os.close(master)
        os.close(slave)


# ---- the SDK's tables ----------------------------------------------------------------------


def test_register_table_baud_rates_and_error_bits_equal_the_sdk() -> None:
    sts = {
        "MODEL_L": ft.ADDR_MODEL_NUMBER, "ID": ft.ADDR_ID, "BAUD_RATE": ft.ADDR_BAUD_RATE,
        "MIN_ANGLE_LIMIT_L": ft.ADDR_MIN_POSITION_LIMIT,
        "MAX_ANGLE_LIMIT_L": ft.ADDR_MAX_POSITION_LIMIT, "OFS_L": ft.ADDR_HOMING_OFFSET,
        "MODE": ft.ADDR_MODE, "TORQUE_ENABLE": ft.ADDR_TORQUE_ENABLE, "ACC": ft.ADDR_ACCELERATION,
        "GOAL_POSITION_L": ft.ADDR_GOAL_POSITION, "GOAL_TIME_L": ft.ADDR_GOAL_TIME,
        "GOAL_SPEED_L": ft.ADDR_GOAL_SPEED, "LOCK": ft.ADDR_LOCK,
        "PRESENT_POSITION_L": ft.ADDR_PRESENT_POSITION, "PRESENT_SPEED_L": ft.ADDR_PRESENT_SPEED,
        "PRESENT_LOAD_L": ft.ADDR_PRESENT_LOAD, "PRESENT_VOLTAGE": ft.ADDR_PRESENT_VOLTAGE,
        "PRESENT_TEMPERATURE": ft.ADDR_PRESENT_TEMPERATURE, "MOVING": ft.ADDR_MOVING,
        "PRESENT_CURRENT_L": ft.ADDR_PRESENT_CURRENT,
    }
    for name, ours in sts.items():
        assert getattr(scs, f"SMS_STS_{name}") == ours, name
    assert ft.SCS.lock_addr == scs.SCSCL_LOCK and scs.SCSCL_GOAL_POSITION_L == 42
    bauds = {"1M": 1_000_000, "0_5M": 500_000, "250K": 250_000, "128K": 128_000,
             "115200": 115_200, "76800": 76_800, "57600": 57_600, "38400": 38_400}
    assert {getattr(scs, f"SMS_STS_{name}"): rate for name, rate in bauds.items()} \
        == ft.BAUD_RATES
    assert {getattr(scs, f"SCSCL_{name}"): rate for name, rate in bauds.items()} \
        == ft.BAUD_RATES
    assert (scs.INST_PING, scs.INST_READ, scs.INST_WRITE, scs.INST_REG_WRITE, scs.INST_ACTION,
            scs.INST_SYNC_READ, scs.INST_SYNC_WRITE) == (ft.PING, ft.READ, ft.WRITE,
                                                         ft.REG_WRITE, ft.ACTION, ft.SYNC_READ,
                                                         ft.SYNC_WRITE)
    assert (scs.ERRBIT_VOLTAGE, scs.ERRBIT_ANGLE, scs.ERRBIT_OVERHEAT, scs.ERRBIT_OVERELE,
            scs.ERRBIT_OVERLOAD) == (ft.ERR_VOLTAGE, ft.ERR_ANGLE, ft.ERR_OVERHEAT,
                                     ft.ERR_OVERCURRENT, ft.ERR_OVERLOAD)
    assert (scs.BROADCAST_ID, scs.MAX_ID) == (ft.BROADCAST_ID, ft.MAX_ID)


@pytest.mark.parametrize(("bit", "limit"), [(15, 32767), (10, 1023), (11, 2047)])
def test_sign_magnitude_equals_the_sdk(bit: int, limit: int) -> None:
    ph = scs.sms_sts(scs.PortHandler("unused"))
    for value in range(-limit, limit + 1):
        raw = ft.to_sign_magnitude(value, bit)
        assert raw == ph.scs_toscs(value, bit)
        assert ft.from_sign_magnitude(raw, bit) == ph.scs_tohost(raw, bit) == value


@pytest.mark.parametrize(("series", "end"), [(ft.STS, 0), (ft.SCS, 1)])
def test_word_byte_order_equals_the_sdk(series: ft.Series, end: int) -> None:
    ph = scs.protocol_packet_handler(scs.PortHandler("unused"), end)
    for value in (0, 1, 0x00FF, 0x0102, 0x7FFF, 0x8000, 0xFFFF, 2048, 4095):
        raw = ft.word(value, series)
        assert list(raw) == [ph.scs_lobyte(value), ph.scs_hibyte(value)]
        assert ft.unword(raw, 0, series) == ph.scs_makeword(raw[0], raw[1]) == value
