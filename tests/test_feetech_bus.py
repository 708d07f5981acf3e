"""FeetechBus against the emulated STS3215 servos over a real pty; the codec's parsers under
hostile bytes."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from sim_arm import IDS, JOINTS, N_JOINTS

from drivers import feetech_protocol as ft
from drivers.bus import BusError, CommandError, MotorFault, MotorState
from drivers.feetech import FeetechBus
from sim.actuators import HW_OVERHEATING, HW_OVERLOAD, Actuators
from sim.feetech_emulator import FeetechEmulator, position_gains_si

ZERO = [2048, 2000, 2100, 2048, 1900, 2048]
DIRECTION = [1, -1, 1, -1, 1, 1]
TICK = 1.0 / ft.STS3215.ticks_per_rad


@pytest.fixture
def actuators() -> Actuators:
    act = Actuators(N_JOINTS)
    act.q[:] = [0.5, -0.3, 1.2, -1.0, 0.0, 0.4]
    act.dq[:] = [1.0, -2.0, 0.5, 0.0, 3.0, -0.1]
    act.tau[:] = [0.2, -0.5, 1.0, 0.0, -1.5, 0.05]
    return act


@pytest.fixture
def emulator(actuators: Actuators) -> Iterator[FeetechEmulator]:
    emu = FeetechEmulator(actuators, IDS, zero_ticks=ZERO, direction=DIRECTION)
    emu.open()
    emu.start()
    yield emu
    emu.stop()


def make_bus(path: str, **kwargs: object) -> FeetechBus:
    args: dict = dict(zero_ticks=ZERO, direction=DIRECTION, timeout_ms=50.0, retries=1)
    args.update(kwargs)
    return FeetechBus(path, 1_000_000, IDS, JOINTS, **args)


@pytest.fixture
def bus(emulator: FeetechEmulator) -> Iterator[FeetechBus]:
    b = make_bus(emulator.path)
    b.open()
    yield b
    b.close()


def test_read_gives_si_units_with_zero_and_direction(bus: FeetechBus,
                                                     actuators: Actuators) -> None:
    state = MotorState(N_JOINTS)
    bus.read(state)
    np.testing.assert_allclose(state.q, actuators.q, atol=TICK)
    np.testing.assert_allclose(state.dq, actuators.dq, atol=TICK)
    # load in 0.1 % of the stall torque: one count is 1.9 mN·m
    np.testing.assert_allclose(state.effort, actuators.tau, atol=ft.STS3215.stall_torque_nm / 1e3)
    np.testing.assert_allclose(state.temperature_c, 30.0)
    np.testing.assert_allclose(bus.voltage_v, 7.4)
    assert not state.error_flags.any() and bus.stats.reads == 1
    assert bus.return_delay_us == [0.0] * N_JOINTS


def test_write_reaches_the_goal_and_refuses_outside_the_limits(
        bus: FeetechBus, emulator: FeetechEmulator, actuators: Actuators) -> None:
    goal = np.array([0.1, -0.2, 0.3, -0.4, 0.5, 0.6])
    bus.write(goal)
    deadline = time.monotonic() + 2.0
    while not np.allclose(actuators.goal_q, goal, atol=TICK) and time.monotonic() < deadline:
        time.sleep(0.001)
    np.testing.assert_allclose(actuators.goal_q, goal, atol=TICK)
    with pytest.raises(CommandError, match=r"elbow \(id 3\)") as err:
        bus.write(np.array([0.0, 0.0, 4.0, 0.0, 0.0, 0.0]))  # > 4095 ticks
    assert err.value.motor == "elbow"
    with pytest.raises(CommandError, match="not finite"):
        bus.write(np.array([0.0, math.nan, 0.0, 0.0, 0.0, 0.0]))
    assert bus.stats.writes == 1


def test_torque_enable_and_present_goal(bus: FeetechBus, actuators: Actuators) -> None:
    out = np.zeros(N_JOINTS)
    assert bus.present_goal(out) is False  # power-on: torque off, out = measured position
    np.testing.assert_allclose(out, actuators.q, atol=TICK)
    bus.enable_torque(True)
    assert actuators.torque_enabled.all()
    bus.write(np.full(N_JOINTS, 0.2))
    time.sleep(0.05)
    assert bus.present_goal(out) is True
    np.testing.assert_allclose(out, 0.2, atol=TICK)
    bus.enable_torque(False)
    assert not actuators.torque_enabled.any()


def test_hardware_fault_names_the_servo_and_its_bits(bus: FeetechBus,
                                                     actuators: Actuators) -> None:
    bus.enable_torque(True)
    actuators.hw_error[3] = HW_OVERLOAD | HW_OVERHEATING
    state = MotorState(N_JOINTS)
    with pytest.raises(MotorFault, match=r"wrist_pitch \(id 4\): overheat, overload") as err:
        bus.read(state)
    assert err.value.motor == "wrist_pitch"
    assert state.error_flags[3] == ft.ERR_OVERHEAT | ft.ERR_OVERLOAD
    assert not actuators.torque_enabled[3]  # unloaded by the servo
    with pytest.raises(MotorFault, match="torque stays off"):
        bus.enable_torque(True)


def test_a_silent_servo_times_out_naming_it(bus: FeetechBus, actuators: Actuators) -> None:
    actuators.silent[4] = True
    with pytest.raises(BusError, match=r"wrist_roll \(id 5\)") as err:
        bus.read(MotorState(N_JOINTS))
    assert err.value.motor == "wrist_roll"
    assert bus.stats.per_motor_errors["wrist_roll"] == 2  # one try + one retry
    assert bus.stats.errors == 1 and bus.stats.retries == 1


def test_open_puts_a_wheel_mode_servo_in_position_mode_and_relocks(
        emulator: FeetechEmulator) -> None:
    table = emulator.tables[2]
    table[ft.ADDR_MODE], table[ft.ADDR_RETURN_DELAY] = 1, 25
    b = make_bus(emulator.path)
    b.open()
    try:
        assert table[ft.ADDR_MODE] == ft.MODE_POSITION and table[ft.ADDR_LOCK] == 1
        assert b.return_delay_us[2] == 50.0
    finally:
        b.close()


def test_open_refuses_another_model(emulator: FeetechEmulator) -> None:
    emulator.tables[1][ft.ADDR_MODEL_NUMBER : ft.ADDR_MODEL_NUMBER + 2] = ft.word(2825)
    b = make_bus(emulator.path)
    with pytest.raises(BusError, match=r"shoulder \(id 2\): model number 2825 \(STS3250\)"):
        b.open()
    b.close()


def test_gain_map_is_the_documented_one() -> None:
    kp, kd = position_gains_si(32, 32, ft.STS3215)
    assert kp == pytest.approx(32 / 1000 * 4096 / (2 * math.pi) * 1.91)
    assert kd == pytest.approx(1.91 / (45 * 2 * math.pi / 60) + kp * 1e-3)


# ---- the codec under hostile bytes ---------------------------------------------------------


def _replies(rng: random.Random, ids: list[int], n_data: int) -> list[bytes]:
    return [ft.status_packet(i, 0, bytes(rng.randrange(256) for _ in range(n_data)))
            for i in ids]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_parsers_never_raise_on_garbage(data: bytes) -> None:
    parser = ft.StreamParser()
    parser.feed(data)
    list(parser)
    replies = ft.SyncReplyParser(IDS, 8)
    rx = bytearray(data) + bytearray(64)
    replies.feed(rx, len(data))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5), st.integers(0, 13), st.integers(1, 255), st.integers(0, 2**32))
def test_one_flipped_byte_fails_only_its_servo(victim: int, at: int, xor: int,
                                               seed: int) -> None:
    """Any byte of one reply flipped: that servo is blamed, every other reply is kept, and
    the parser settles without waiting for bytes that will never come."""
    rng = random.Random(seed)
    packets = _replies(rng, IDS, 8)
    bad = bytearray(packets[victim])
    bad[at] ^= xor
    packets[victim] = bytes(bad)
    wire = bytearray(b"".join(packets))
    parser = ft.SyncReplyParser(IDS, 8)
    assert parser.feed(wire, len(wire))
    good = {k for k in range(6) if parser.seen[k]}
    assert good >= set(range(6)) - {victim}
    for k in good - {victim}:
        assert wire[parser.offset[k] : parser.offset[k] + 8] == packets[k][5:13]
    if victim in good:  # the flip hit a byte the checksum cannot see: never, for one byte
        pytest.fail(f"a corrupt reply of servo {victim} was accepted")


INSTRUCTIONS = [ft.PING, ft.READ, ft.WRITE, ft.REG_WRITE, ft.ACTION, ft.SYNC_READ,
                ft.SYNC_WRITE, 0x99]


@settings(max_examples=500, deadline=None)
@example([(1, ft.WRITE, ft.ADDR_MIN_POSITION_LIMIT, b"\xff" * 4),  # limits past 15 bits
          (1, ft.WRITE, ft.ADDR_GOAL_POSITION, b"\x00\x08")])
@given(st.lists(st.tuples(st.sampled_from([1, 2, ft.BROADCAST_ID, 0x42]),
                          st.sampled_from(INSTRUCTIONS), st.integers(0, 80),
                          st.binary(max_size=12)), max_size=12))
def test_the_emulator_survives_any_instruction(
        packets: list[tuple[int, int, int, bytes]]) -> None:
    """Hostile or mistaken clients (unlocked EEPROM, wild limits, torn packets) never raise out
    of the emulator's answer: its serving thread is the sim's servos."""
    act = Actuators(N_JOINTS)
    emu = FeetechEmulator(act, IDS)
    emu.tables[0][ft.ADDR_LOCK] = 0
    for servo_id, instruction, address, params in packets:
        wire = ft._frame(servo_id, instruction, bytes((address,)) + params)
        emu.answer(wire[: len(wire) - (address % 5 == 0)])  # some torn


def test_stream_parser_resyncs_after_garbage_and_ff_runs() -> None:
    rng = random.Random(3)
    packets = _replies(rng, [1, 2, 3], 4)
    parser = ft.StreamParser()
    parser.feed(b"\x00\xff\xff\xff" + packets[0] + b"\xff\xff\x07\x09junk" + packets[1])
    parser.feed(packets[2][:5])
    got = [p.id for p in parser]
    parser.feed(packets[2][5:])
    got += [p.id for p in parser]
    assert got == [1, 2, 3]


@pytest.mark.parametrize(("override", "key", "reason"), [
    ("bus.model=STS9999", "bus.model", "not one of STS3215"),
    ("bus.baudrate=115201", "bus.baudrate", "not a Feetech servo's rate"),
    ("bus.ids=[1,2,3,4,5,5]", "bus.ids", "unique"),
    ("bus.ids=[1,2,3,4,5,253]", "bus.ids", "0..252"),
    ("bus.return_delay_us=500", "bus", "at most 165 Hz"),
])
def test_config_refuses_what_the_servos_cannot_do(override: str, key: str, reason: str) -> None:
    from sim_arm import REPO

    from runtime.config import ConfigError, load_config

    with pytest.raises(ConfigError) as err:
        load_config(REPO / "configs" / "so101_sim.yaml", overrides=[override])
    assert key in str(err.value) and reason in str(err.value)


def test_hot_path_does_not_grow_memory() -> None:
    # the emulator runs in another process so only the driver's allocations are traced
    import tracemalloc

    from sim.dynamixel_emulator import EmulatorProcess

    q = [0.1, 0.2, -0.3, 0.4, -0.5, 0.6]
    with EmulatorProcess(IDS, q, "sim.feetech_emulator:FeetechEmulator") as path:
        b = FeetechBus(path, 1_000_000, IDS, JOINTS, timeout_ms=200.0)
        b.open()
        state = MotorState(6)
        for _ in range(50):
            b.read(state)
            b.write(state.q)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        for _ in range(300):
            b.read(state)
            b.write(state.q)
        _, peak = tracemalloc.get_traced_memory()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        b.close()
    np.testing.assert_allclose(state.q, q, atol=TICK)
    driver = [tracemalloc.Filter(True, "*drivers/feetech*.py")]
    growth = sum(
        d.size_diff
        for d in after.filter_traces(driver).compare_to(before.filter_traces(driver), "filename"))
    assert growth < 512, f"driver retained {growth} B over 300 ticks"
    assert peak - base < 2048, f"transient peak {peak - base} B in a tick"
