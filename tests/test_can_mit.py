"""MIT-mode codec and MitCanBus against real python-can virtual buses and the sim emulator."""

from __future__ import annotations

import itertools
import threading
import time

import can
import numpy as np
import pytest

from drivers.bus import BusError, MotorState
from drivers.can_mit import (
    ENTER_MOTOR_MODE,
    EXIT_MOTOR_MODE,
    MitCanBus,
    MitRanges,
    float_to_uint,
    pack_command,
    pack_reply,
    unpack_command,
    unpack_reply,
)
from sim.actuators import MODE_MIT, Actuators
from sim.can_emulator import MitCanEmulator

R = MitRanges(p_max=12.5, v_max=30.0, t_max=10.0, kp_max=500.0, kd_max=5.0)
JOINTS = ["base_yaw", "shoulder", "elbow", "wrist_pitch", "wrist_roll", "gripper"]
IDS = [1, 2, 3, 4, 5, 6]
_channels = itertools.count()


def channel() -> str:
    return f"duet-test-{next(_channels)}"


# -- codec ------------------------------------------------------------------------------------


def test_command_round_trip_within_one_quantum() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        p, v, t = rng.uniform(-12.5, 12.5), rng.uniform(-30, 30), rng.uniform(-10, 10)
        kp, kd = rng.uniform(0, 500), rng.uniform(0, 5)
        out = unpack_command(pack_command(p, v, kp, kd, t, R), R)
        quanta = (25 / 65535, 60 / 4095, 500 / 4095, 5 / 4095, 20 / 4095)
        for got, want, q in zip(out, (p, v, kp, kd, t), quanta, strict=True):
            assert abs(got - want) <= q / 2 + 1e-12


def test_range_edges_are_exact_and_bit_layout_matches_katz() -> None:
    data = pack_command(12.5, 30.0, 500.0, 5.0, 10.0, R)
    assert data == bytes([0xFF] * 8)  # all-ones is every field at its maximum
    assert pack_command(-12.5, -30.0, 0.0, 0.0, -10.0, R) == bytes(8)
    assert unpack_command(bytes([0xFF] * 8), R) == (12.5, 30.0, 500.0, 5.0, 10.0)
    # p = 0x1234, v = 0x567, kp = 0x89A, kd = 0xBCD, t = 0xEF0
    raw = bytes([0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xF0])
    p, v, kp, kd, t = unpack_command(raw, R)
    assert float_to_uint(p, -12.5, 12.5, 16) == 0x1234
    assert float_to_uint(v, -30, 30, 12) == 0x567
    assert float_to_uint(kp, 0, 500, 12) == 0x89A
    assert float_to_uint(kd, 0, 5, 12) == 0xBCD
    assert float_to_uint(t, -10, 10, 12) == 0xEF0
    assert pack_command(p, v, kp, kd, t, R) == raw


def test_out_of_range_values_clamp_and_nan_is_refused() -> None:
    assert pack_command(99.0, 1e9, 1e4, 50.0, float("inf"), R) == bytes([0xFF] * 8)
    assert pack_command(-99.0, -1e9, -3.0, -1.0, float("-inf"), R) == bytes(8)
    _, p, v, t = unpack_reply(pack_reply(7, 20.0, -40.0, 11.0, R), R)
    assert (p, v, t) == (12.5, -30.0, 10.0)
    with pytest.raises(ValueError, match="NaN"):
        pack_command(float("nan"), 0, 0, 0, 0, R)


def test_reply_round_trip_and_layout() -> None:
    data = pack_reply(3, 1.25, -2.5, 4.0, R)
    assert len(data) == 6 and data[0] == 3
    motor, p, v, t = unpack_reply(data, R)
    assert motor == 3
    assert abs(p - 1.25) <= 25 / 65535 and abs(v + 2.5) <= 60 / 4095 and abs(t - 4.0) <= 20 / 4095
    # Damiao appends two temperature bytes: ignored
    assert unpack_reply(data + b"\x20\x21", R) == (motor, p, v, t)
    with pytest.raises(ValueError, match="6 bytes"):
        unpack_reply(data[:5], R)


def test_bad_model_and_bad_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="v_max"):
        MitRanges(12.5, 0.0, 10.0)
    with pytest.raises(ValueError, match="distinct"):
        MitCanBus(JOINTS, [1, 1, 2, 3, 4, 5], R, [1] * 6, [0] * 6, interface="virtual")
    with pytest.raises(ValueError, match="kp must be in"):
        MitCanBus(JOINTS, IDS, R, [600] * 6, [0] * 6, interface="virtual")


# -- MitCanBus on a virtual bus with a scripted motor side ------------------------------------


class Motors:
    """The far end of a virtual bus, answering each command frame as the test scripts it."""

    def __init__(self, ch: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=ch)

    def take(self, n: int) -> list[can.Message]:
        frames = [self.bus.recv(1.0) for _ in range(n)]
        assert all(f is not None for f in frames)
        return frames  # type: ignore[return-value]

    def reply(self, motor_id: int, p: float, arb_id: int = 0) -> None:
        self.bus.send(can.Message(arbitration_id=arb_id, is_extended_id=False,
                                  data=pack_reply(motor_id, p, 0.0, 0.0, R)))


def open_bus(ch: str, timeout_ms: float = 2.0, master_ids: list[int] | None = None,
             direction: list[int] | None = None) -> MitCanBus:
    bus = MitCanBus(JOINTS, IDS, R, [20.0] * 6, [1.0] * 6, interface="virtual", channel=ch,
                    timeout_ms=timeout_ms, master_ids=master_ids, direction=direction)
    bus.open()
    return bus


def test_replies_are_matched_by_id_in_any_order() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch)
    try:
        bus.write(np.zeros(6))
        frames = motors.take(6)
        assert [f.arbitration_id for f in frames] == IDS
        for motor_id in reversed(IDS):
            motors.reply(motor_id, 0.1 * motor_id)
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(out.q, [0.1 * i for i in IDS], atol=25 / 65535)
        assert bus.stats.missing_replies == 0 and bus.stats.reads == 1
    finally:
        bus.close()
        motors.bus.shutdown()


def test_master_ids_match_replies_by_arbitration_id() -> None:
    ch = channel()
    masters = [0x11, 0x12, 0x13, 0x14, 0x15, 0x16]
    motors, bus = Motors(ch), open_bus(ch, master_ids=masters)
    try:
        bus.write(np.zeros(6))
        motors.take(6)
        for j in (3, 0, 5, 1, 4, 2):  # first data byte deliberately useless (Damiao nibble)
            motors.reply(0, 0.5 + j, arb_id=masters[j])
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(out.q, 0.5 + np.arange(6), atol=25 / 65535)
    finally:
        bus.close()
        motors.bus.shutdown()


def test_missing_reply_is_counted_and_names_the_motor() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch, timeout_ms=20.0)
    try:
        bus.write(np.zeros(6))
        motors.take(6)
        for motor_id in IDS:
            if motor_id != 4:
                motors.reply(motor_id, 0.0)
        with pytest.raises(BusError, match=r"wrist_pitch \(id 4\)") as err:
            bus.read(MotorState(6))
        assert err.value.motor == "wrist_pitch"
        assert bus.stats.missing_replies == 1 and bus.stats.timeouts == 1
        assert bus.stats.per_motor_errors["wrist_pitch"] == 1
        # the late reply must not pass for the next transaction's
        motors.reply(4, 3.0)
        time.sleep(0.01)
        bus.write(np.zeros(6))
        motors.take(6)
        for motor_id in IDS:
            motors.reply(motor_id, 1.0)
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(out.q, 1.0, atol=25 / 65535)
        assert bus.late_replies == 1
    finally:
        bus.close()
        motors.bus.shutdown()


def test_first_read_queries_with_zero_gains_then_repeats_last_command() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch, timeout_ms=500.0)
    seen: list[can.Message] = []

    def answer() -> None:  # a motor side that answers every frame, recording it
        while (f := motors.bus.recv(1.0)) is not None:
            seen.append(f)
            motors.reply(f.arbitration_id, 0.0)

    responder = threading.Thread(target=answer)
    responder.start()
    try:
        bus.read(MotorState(6))
        assert len(seen) == 6
        for f in seen:
            _, _, kp, kd, t = unpack_command(f.data, R)
            assert kp == 0.0 and kd == 0.0 and abs(t) <= 20 / 4095
        bus.write(np.full(6, 0.7))
        bus.read(MotorState(6))
        bus.read(MotorState(6))  # no write in between: the last command again
        assert len(seen) == 18
        for f in seen[12:]:
            p, _, kp, _, _ = unpack_command(f.data, R)
            assert abs(p - 0.7) <= 25 / 65535 and abs(kp - 20.0) <= 500 / 4095
        assert bus.stats.errors == 0 and bus.late_replies == 0
    finally:
        bus.close()
        responder.join()
        motors.bus.shutdown()


# -- MitCanBus <-> MitCanEmulator ------------------------------------------------------------


@pytest.fixture
def rig():
    ch = channel()
    act = Actuators(6)
    act.q[:] = [0.1, -0.2, 0.3, -0.4, 0.5, 0.6]
    act.dq[:] = [1.0, -1.0, 0.5, 0.0, 0.0, 0.0]
    act.tau[:] = [2.0, -3.0, 0.0, 0.0, 15.0, 0.0]  # joint 5 beyond t_max
    emu = MitCanEmulator(act, IDS, R, can.Bus(interface="virtual", channel=ch))
    emu.start()
    bus = open_bus(ch, timeout_ms=100.0, direction=[1, 1, 1, 1, 1, -1])
    yield act, emu, bus
    bus.close()
    emu.stop()


def test_bus_and_emulator_round_trip(rig) -> None:
    act, _, bus = rig
    out = MotorState(6)
    bus.read(out)
    want_q = act.q * [1, 1, 1, 1, 1, -1]
    np.testing.assert_allclose(out.q, want_q, atol=25 / 65535)
    np.testing.assert_allclose(out.dq, act.dq * [1, 1, 1, 1, 1, -1], atol=60 / 4095)
    assert out.effort[4] == pytest.approx(10.0)  # clamped at the model's t_max
    assert out.t_ns > 0
    assert not act.torque_enabled.any()  # queries never enable anything

    bus.write(np.full(6, 0.25))  # before motor mode: answered, not applied
    bus.read(out)
    assert not act.goal_q.any()

    bus.enable_torque(True)
    assert act.torque_enabled.all() and (act.mode == MODE_MIT).all()
    target = np.array([0.5, -0.5, 1.0, -1.0, 0.2, 0.4])
    bus.write(target, kd=np.full(6, 0.5), tau_ff=np.full(6, 1.5), dq_target=np.full(6, 2.0))
    bus.read(out)
    with act.lock:  # the motors see joint 6 mirrored (direction -1)
        np.testing.assert_allclose(act.goal_q * [1, 1, 1, 1, 1, -1], target, atol=25 / 65535)
        np.testing.assert_allclose(act.kp, 20.0, atol=500 / 4095)
        np.testing.assert_allclose(act.kd, 0.5, atol=5 / 4095)
        np.testing.assert_allclose(act.tau_ff * [1, 1, 1, 1, 1, -1], 1.5, atol=20 / 4095)
        np.testing.assert_allclose(act.goal_dq * [1, 1, 1, 1, 1, -1], 2.0, atol=60 / 4095)
    assert bus.stats.errors == 0 and bus.stats.writes == 2 and bus.stats.reads == 3

    bus.enable_torque(False)
    assert not act.torque_enabled.any()


def test_zero_position_offsets_readings_and_targets(rig) -> None:
    act, _, bus = rig
    bus.zero_position()
    out = MotorState(6)
    bus.read(out)
    np.testing.assert_allclose(out.q, 0.0, atol=25 / 65535)
    bus.enable_torque(True)
    bus.write(np.full(6, 0.1))
    bus.read(out)
    step = np.array([0.1, 0.1, 0.1, 0.1, 0.1, -0.1])  # joint 6 mirrored
    np.testing.assert_allclose(act.goal_q, act.q + step, atol=25 / 65535)


def test_silent_emulated_motor_raises_naming_it(rig) -> None:
    act, _, bus = rig
    bus.timeout_s = 0.03
    act.silent[1] = True
    with pytest.raises(BusError, match="shoulder"):
        bus.read(MotorState(6))
    with pytest.raises(BusError, match="shoulder"):
        bus.enable_torque(True)
    assert bus.stats.missing_replies == 2


def test_emulator_ignores_frames_for_other_ids(rig) -> None:
    _, emu, bus = rig
    peer = can.Bus(interface="virtual", channel=bus.channel)
    try:
        peer.send(can.Message(arbitration_id=0x40, is_extended_id=False, data=ENTER_MOTOR_MODE))
        peer.send(can.Message(arbitration_id=1, is_extended_id=False, data=EXIT_MOTOR_MODE[:6]))
        deadline = time.monotonic() + 1.0
        while emu.ignored < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert emu.ignored == 2 and emu.replies_out == 0
    finally:
        peer.shutdown()


def test_wire_time_is_two_frames_per_motor() -> None:
    bus = MitCanBus(JOINTS, IDS, R, [1] * 6, [0] * 6, interface="virtual", bitrate=1_000_000)
    assert bus.wire_time_us() == pytest.approx(6 * (135 + 115))
