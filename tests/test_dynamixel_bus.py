"""DynamixelBus against the emulated servos over a real pty."""

from __future__ import annotations

import math
import struct
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import numpy as np
import pytest
from sim_arm import IDS, JOINTS, N_JOINTS

from drivers import dynamixel_protocol as dx
from drivers.bus import BusError, CommandError, MotorFault, MotorState
from drivers.dynamixel import DynamixelBus
from runtime.config import DynamixelBusConfig
from sim.actuators import HW_OVERLOAD, Actuators
from sim.dynamixel_emulator import DynamixelEmulator, EmulatorProcess, position_gains_si

ZERO = [2048, 2000, 2100, 2048, 1900, 2048]
DIRECTION = [1, -1, 1, -1, 1, 1]
RAD_PER_TICK = 2 * math.pi / 4096


@pytest.fixture
def actuators() -> Actuators:
    act = Actuators(N_JOINTS)
    act.q[:] = [0.5, -0.3, 1.2, -1.0, 0.0, 0.4]
    act.dq[:] = [1.0, -2.0, 0.5, 0.0, 3.0, -0.1]
    act.tau[:] = [0.2, -0.5, 1.0, 0.0, -1.5, 0.05]
    return act


@pytest.fixture
def emulator(actuators: Actuators) -> Iterator[DynamixelEmulator]:
    emu = DynamixelEmulator(actuators, IDS, zero_ticks=ZERO, direction=DIRECTION)
    emu.open()
    emu.start()
    yield emu
    emu.stop()


def make_bus(path: str, **kwargs: object) -> DynamixelBus:
    args: dict = dict(zero_ticks=ZERO, direction=DIRECTION, timeout_ms=20.0, retries=1)
    args.update(kwargs)
    return DynamixelBus(path, 4_000_000, IDS, JOINTS, **args)


@pytest.fixture
def bus(emulator: DynamixelEmulator) -> Iterator[DynamixelBus]:
    b = make_bus(emulator.path)
    b.open()
    yield b
    b.close()


def wait_until(predicate: Callable[[], bool], timeout_s: float = 2.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.001)
    return False


def test_read_converts_units(bus: DynamixelBus, actuators: Actuators) -> None:
    state = MotorState(6)
    bus.read(state)
    np.testing.assert_allclose(state.q, actuators.q, atol=RAD_PER_TICK)
    np.testing.assert_allclose(state.dq, actuators.dq, atol=dx.VELOCITY_UNIT_RAD_S)
    effort_unit = dx.CURRENT_UNIT_A * dx.XM430_TORQUE_CONSTANT_NM_PER_A
    np.testing.assert_allclose(state.effort, actuators.tau, atol=effort_unit)
    assert state.t_ns > 0 and not state.error_flags.any()
    assert bus.stats.reads == 1 and bus.stats.errors == 0
    assert bus.models == {i: dx.MODEL_XM430_W350 for i in IDS}


def test_write_sets_goal_and_torque(bus: DynamixelBus, actuators: Actuators) -> None:
    target = np.array([0.1, -0.2, 0.3, -0.4, 0.5, 0.6])
    bus.write(target)
    assert wait_until(lambda: np.allclose(actuators.goal_q, target, atol=RAD_PER_TICK))
    assert not actuators.torque_enabled.any()  # goal stored, no effect until torque is on
    bus.enable_torque(True)
    assert actuators.torque_enabled.all()
    kp, kd = position_gains_si(800, 0)
    np.testing.assert_allclose(actuators.kp, kp)
    assert 10 < kp < 40 and kd > 0.5  # stiff, damped by back-EMF
    bus.enable_torque(False)
    assert not actuators.torque_enabled.any()
    assert bus.stats.writes == 1



def test_the_per_tick_exchange_never_waits_for_the_actuator_lock(
        bus: DynamixelBus, actuators: Actuators) -> None:
    """The sim's lock may be held by a thread that lost the CPU (the renderer, or the physics
    waiting for the GIL): the goals written and the state read go on without it, as a real
    servo's would."""
    actuators.publish_present(actuators.q, actuators.dq, actuators.tau)  # a physics step
    target = np.array([0.1, -0.2, 0.3, -0.4, 0.5, 0.6])
    state = MotorState(6)
    with actuators.lock:
        for _ in range(3):
            bus.write(target)
            bus.read(state)  # answered in order after the write: it was not held up
        assert wait_until(lambda: np.allclose(actuators.goal_q, target, atol=RAD_PER_TICK))
    assert bus.stats.errors == 0

def test_goal_ticks_on_the_wire_follow_zero_and_direction(
    bus: DynamixelBus, emulator: DynamixelEmulator
) -> None:
    bus.write(np.full(N_JOINTS, 0.25))
    expected = [round(z + d * 0.25 / RAD_PER_TICK) for z, d in zip(ZERO, DIRECTION, strict=True)]

    def goals() -> list[int]:
        return [struct.unpack_from("<i", t, dx.ADDR_GOAL_POSITION)[0] for t in emulator.tables]

    assert wait_until(lambda: goals() == expected)


def test_write_rejects_bad_targets(bus: DynamixelBus) -> None:
    q = np.zeros(N_JOINTS)
    q[2] = np.nan
    with pytest.raises(CommandError, match=r"elbow \(id 3\) = nan rad is not finite") as err:
        bus.write(q)
    assert err.value.motor == "elbow"
    q[2] = np.inf
    with pytest.raises(CommandError, match="elbow"):
        bus.write(q)
    q[2] = 0.0
    q[5] = 4.0  # beyond one revolution from zero: outside Min/Max Position Limit
    with pytest.raises(CommandError, match=r"gripper .*limits \[0, 4095\] ticks"):
        bus.write(q)
    with pytest.raises(CommandError, match="MIT"):
        bus.write(np.zeros(N_JOINTS), kp=np.ones(N_JOINTS))
    assert bus.stats.writes == 0


def test_open_selects_position_mode(actuators: Actuators) -> None:
    emu = DynamixelEmulator(actuators, IDS)
    path = emu.open()
    emu.tables[3][dx.ADDR_OPERATING_MODE] = 1  # velocity mode, torque on
    emu.tables[3][dx.ADDR_TORQUE_ENABLE] = 1
    emu.start()
    try:
        b = make_bus(path, zero_ticks=None, direction=None)
        b.open()
        assert emu.tables[3][dx.ADDR_OPERATING_MODE] == dx.OPERATING_MODE_POSITION
        b.close()
    finally:
        emu.stop()


def test_eeprom_write_rejected_with_torque_on(bus: DynamixelBus) -> None:
    bus.enable_torque(True)
    with pytest.raises(BusError, match="access error"):
        bus.write_register(1, dx.ADDR_OPERATING_MODE, 1, 1)


def test_from_config() -> None:
    cfg = DynamixelBusConfig(device="/dev/null", ids=IDS, timeout_ms=3.0, retries=2)
    b = DynamixelBus.from_config(cfg, JOINTS)
    assert (b.ids, b.joint_names, b.timeout_ms, b.retries) == (IDS, JOINTS, 3.0, 2)
    assert b.baudrate == 4_000_000


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        DynamixelBus("/dev/null", 4_000_000, IDS, JOINTS[:5])
    with pytest.raises(ValueError):
        DynamixelBus("/dev/null", 4_000_000, IDS, JOINTS, direction=[1, 1, 1, 1, 1, 2])
    with pytest.raises(BusError, match="cannot open"):
        DynamixelBus("/nonexistent/tty", 4_000_000, IDS, JOINTS).open()


def test_wire_time(bus: DynamixelBus, emulator: DynamixelEmulator) -> None:
    # sync read (14 + 6) + 6 replies of 21 + sync write (14 + 5*6) bytes, 10 bits each at 4 Mbps
    assert bus.wire_time_us() == pytest.approx(190 * 10 / 4e6 * 1e6)
    for table in emulator.tables:
        table[dx.ADDR_RETURN_DELAY] = 5  # 10 µs
    bus.open()
    assert bus.wire_time_us() == pytest.approx(475.0 + 6 * 10.0)


def test_silent_motor_is_named_without_waiting_when_the_next_one_answers(
        bus: DynamixelBus, actuators: Actuators) -> None:
    actuators.silent[2] = True
    state = MotorState(6)
    bus.timeout_ms = 500.0  # replies come in request order: wrist_pitch's settles elbow
    t0 = time.monotonic()
    with pytest.raises(BusError, match=r"no reply \(the next motor answered first\) from"
                                       r" elbow \(id 3\)$") as info:
        bus.read(state)
    assert time.monotonic() - t0 < 0.25  # both attempts, neither waited out 500 ms
    assert info.value.motor == "elbow" and not isinstance(info.value, MotorFault)
    s = bus.stats
    assert (s.timeouts, s.retries, s.errors, s.reads) == (0, 1, 1, 0)
    assert s.missing_replies == 2 and s.per_motor_errors["elbow"] == 2
    assert sum(s.per_motor_errors.values()) == 2  # nobody else blamed
    actuators.silent[2] = False
    bus.read(state)  # recovers
    assert bus.stats.reads == 1


def test_silent_last_motor_times_out(bus: DynamixelBus, actuators: Actuators) -> None:
    actuators.silent[5] = True
    with pytest.raises(BusError, match=r"no reply within 20.0 ms from gripper \(id 6\)$"):
        bus.read(MotorState(6))
    s = bus.stats
    assert (s.timeouts, s.missing_replies, s.per_motor_errors["gripper"]) == (2, 2, 2)
    assert sum(s.per_motor_errors.values()) == 2


@pytest.mark.parametrize(("byte", "reason"), [(5, "length field"), (0, "(?:garbled|no) reply"),
                                              (3, "(?:garbled|no) reply"), (10, "CRC error")])
def test_one_corrupt_reply_fails_only_its_motor_at_once(
        bus: DynamixelBus, emulator: DynamixelEmulator, byte: int, reason: str) -> None:
    """The sim's `corrupt` fault aimed at the elbow's replies: at the length byte (0x0E -> a
    length no reply has), the header (a reply's bytes with no packet in them) or the data
    (CRC). The other five
    replies are parsed as they arrive and only the elbow is blamed, without a timeout."""
    bus.timeout_ms = 500.0
    emulator.corrupt_probability, emulator.corrupt_byte = 1.0, byte
    emulator.corrupt_servos = frozenset({2})
    state = MotorState(6)
    t0 = time.monotonic()
    with pytest.raises(BusError, match=rf"^sync read: {reason}[^;]* from elbow \(id 3\)$"):
        bus.read(state)
    assert time.monotonic() - t0 < 0.25
    assert bus.stats.timeouts == 0
    assert bus.stats.per_motor_errors == {name: 2 if name == "elbow" else 0 for name in JOINTS}
    emulator.corrupt_probability = 0.0
    bus.read(state)
    assert bus.stats.reads == 1


@pytest.mark.parametrize(("servo", "byte", "bits"), [
    (5, 5, 0x01),  # the last reply's length 0x0E -> 0x0F: waited out the timeout for a byte
    (5, 2, 0x01),  # the last reply's header: its bytes came, no packet in them
    (1, 4, 0x04),  # the shoulder's id 2 -> 6: blamed the gripper, whose reply was still to come
    (2, 5, 0x80),  # the elbow's length 0x0E -> 0x8E
    (0, 12, 0x10),  # a data byte of the first reply (CRC)
])
def test_one_flipped_bit_costs_a_retry_of_that_servo_alone(
        bus: DynamixelBus, emulator: DynamixelEmulator, actuators: Actuators, servo: int,
        byte: int, bits: int) -> None:
    """One flipped bit in one reply of a SYNC READ: the other five replies are kept, the retry
    asks only the servo that failed, and the read succeeds, without waiting out the timeout."""
    bus.timeout_ms = 500.0
    state = MotorState(6)
    bus.read(state)
    truth = state.q.copy()
    emulator.corrupt_probability, emulator.corrupt_byte = 1.0, byte
    emulator.corrupt_servos, emulator.corrupt_bits = frozenset({servo}), bits
    emulator.corrupt_count = 1
    served = emulator.packets_served
    state.q[:] = np.nan
    t0 = time.monotonic()
    bus.read(state)
    assert time.monotonic() - t0 < 0.25  # a timeout would be 500 ms
    np.testing.assert_array_equal(state.q, truth)
    assert emulator.corrupt_count == 0 and emulator.packets_served == served + 2
    s = bus.stats
    assert (s.retries, s.errors, s.timeouts, s.reads) == (1, 0, 0, 2)
    assert s.per_motor_errors == {name: int(k == servo) for k, name in enumerate(JOINTS)}


def test_corrupted_replies_counted_never_accepted(
    bus: DynamixelBus, emulator: DynamixelEmulator, actuators: Actuators
) -> None:
    state = MotorState(6)
    bus.read(state)
    truth = state.q.copy(), state.dq.copy(), state.effort.copy()
    emulator.corrupt_probability = 0.2
    ok = failed = 0
    for _ in range(150):
        state.q[:] = np.nan
        try:
            bus.read(state)
        except BusError:
            failed += 1
            continue
        ok += 1
        for got, want in zip((state.q, state.dq, state.effort), truth, strict=True):
            np.testing.assert_array_equal(got, want)
    assert bus.stats.crc_errors > 0 and ok > 0
    assert bus.stats.errors == failed
    emulator.corrupt_probability = 1.0
    with pytest.raises(BusError, match=r"CRC|length|cut short|no reply"):
        bus.read(state)


def test_hardware_error_raises_motor_fault(bus: DynamixelBus, actuators: Actuators) -> None:
    bus.enable_torque(True)
    actuators.hw_error[1] = HW_OVERLOAD
    state = MotorState(6)
    with pytest.raises(MotorFault, match=r"shoulder \(id 2\): overload") as info:
        bus.read(state)
    assert info.value.motor == "shoulder"
    assert state.error_flags[1] == HW_OVERLOAD and state.error_flags.sum() == HW_OVERLOAD
    assert not actuators.torque_enabled[1]  # the servo's shutdown turned torque off
    with pytest.raises(MotorFault, match="shoulder"):
        bus.enable_torque(True)
    bus.reboot(2)
    bus.read(state)
    assert not state.error_flags.any()


def test_device_disappearing_raises_bus_error(
    bus: DynamixelBus, emulator: DynamixelEmulator
) -> None:
    state = MotorState(6)
    bus.read(state)
    emulator.close_line()
    with pytest.raises(BusError, match="device gone"):
        bus.read(state)
    with pytest.raises(BusError, match="device gone"):
        bus.write(np.zeros(N_JOINTS))


def test_hot_path_does_not_grow_memory() -> None:
    # the emulator runs in another process so only the driver's allocations are traced
    q = [0.1, 0.2, -0.3, 0.4, -0.5, 0.6]
    with EmulatorProcess(IDS, q) as path:
        b = DynamixelBus(path, 4_000_000, IDS, JOINTS, timeout_ms=200.0)
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
    np.testing.assert_allclose(state.q, q, atol=RAD_PER_TICK)
    driver = [tracemalloc.Filter(True, "*drivers/dynamixel*.py")]
    growth = sum(
        d.size_diff
        for d in after.filter_traces(driver).compare_to(before.filter_traces(driver), "filename")
    )
    assert growth < 512, f"driver retained {growth} B over 300 ticks"
    assert peak - base < 2048, f"transient peak {peak - base} B in a tick"


# -- restart: present_goal under gravity, with the sim's physics ------------------------------


class Physics:
    """SimWorld (MuJoCo, gravity) stepping its actuators in real time on a thread."""

    def __init__(self, actuators: Actuators) -> None:
        from sim.world import SimWorld

        self.world = SimWorld(actuators=actuators)
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        t = time.monotonic()
        while not self._stop:
            self.world.step(1)
            t += self.world.dt
            time.sleep(max(0.0, t - time.monotonic()))

    def advance(self, seconds: float, timeout_s: float = 60.0) -> None:
        """Wait until the world has run `seconds` of simulated time (a loaded host runs the
        physics late and in bursts; what the servos do depends on simulated time)."""
        until = self.world.time + seconds
        deadline = time.monotonic() + timeout_s
        while self.world.time < until:
            assert time.monotonic() < deadline, "the physics thread stalled"
            time.sleep(0.01)

    def stop(self) -> None:
        self._stop = True
        self._thread.join()


def test_present_goal_after_a_restart_is_the_goal_written_and_holding_it_moves_nothing() -> None:
    """A follower restart under load: the servos hold their goal with a steady-state error
    (gravity); the new process reads back Goal Position, so re-commanding it moves nothing,
    where re-commanding the measured position would sag by that error."""
    from sim.dynamixel_emulator import SERVO_MODELS
    from sim.robot import default_robot

    robot = default_robot()
    HOME_Q, SIM_JOINTS = robot.home, robot.joints
    JOINT_SERVOS = [m.name for m in robot.motors.models]

    act = Actuators(N_JOINTS)
    physics = Physics(act)
    emu = DynamixelEmulator(act, IDS, models=[SERVO_MODELS[m] for m in JOINT_SERVOS])
    path = emu.open()
    emu.start()
    try:
        assert list(SIM_JOINTS) == JOINTS
        first = DynamixelBus(path, 4_000_000, IDS, JOINTS, timeout_ms=100.0)
        first.open()
        goal = HOME_Q + np.array([0.0, 0.35, -0.3, 0.2, 0.0, 0.0])
        first.write(goal)
        first.enable_torque(True)
        physics.advance(1.0)  # settle under gravity
        state = MotorState(6)
        first.read(state)
        sag = np.abs(state.q - goal)
        assert sag[1] > 5 * RAD_PER_TICK, sag  # the shoulder holds off its goal
        first.close()  # the follower dies; the servos keep torque and their goal

        second = DynamixelBus(path, 4_000_000, IDS, JOINTS, timeout_ms=100.0)
        second.open()
        held = np.zeros(N_JOINTS)
        assert second.present_goal(held) is True
        np.testing.assert_allclose(held, goal, atol=RAD_PER_TICK / 2 + 1e-9)  # 1 encoder tick
        second.read(state)
        before = state.q.copy()
        second.write(held)
        physics.advance(0.5)
        second.read(state)
        assert np.abs(state.q - before).max() < 1e-3  # < 1 mrad: within an encoder tick
        second.enable_torque(False)
        time.sleep(0.05)
        second.read(state)
        off = np.zeros(N_JOINTS)
        assert second.present_goal(off) is False  # torque off: the measured position
        np.testing.assert_allclose(off, state.q, atol=0.05)  # it falls meanwhile
        second.close()
    finally:
        emu.stop()
        physics.stop()


def test_a_restored_line_finds_the_servos_holding_their_goal(actuators: Actuators) -> None:
    """The sim's cut_line/restore_line: the servos kept power, so Goal Position and Torque
    Enable continue (a power-on would reset the goal to the present position)."""
    with actuators.lock:
        actuators.torque_enabled[:] = True
        actuators.goal_q[:] = actuators.q + 0.05  # holding under load, off its goal
    emu = DynamixelEmulator(actuators, IDS, zero_ticks=ZERO, direction=DIRECTION)
    path = emu.open(powered=True)
    emu.start()
    try:
        bus = make_bus(path)
        bus.open()
        goal = np.zeros(N_JOINTS)
        assert bus.present_goal(goal) is True
        np.testing.assert_allclose(goal, actuators.q + 0.05, atol=RAD_PER_TICK / 2 + 1e-9)
        bus.close()
    finally:
        emu.stop()
