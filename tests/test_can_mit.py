"""MIT-mode codec, dialects and MitCanBus against real python-can virtual buses and the sim's
emulated motors (every dialect), including restarts that must not move the arm."""

from __future__ import annotations

import itertools
import threading
import time

import can
import numpy as np
import pytest
from sim_arm import IDS, JOINTS, N_JOINTS

from drivers.bus import BusError, CommandError, MotorFault, MotorState
from drivers.can_mit import MitCanBus
from drivers.mit_codec import (
    MitRanges,
    float_to_uint,
    pack_command,
    pack_state_into,
    unpack_command,
    unpack_state,
)
from drivers.mit_dialects import (
    DIALECTS,
    ENTER_MOTOR_MODE,
    EXIT_MOTOR_MODE,
    GenericDialect,
    dialect_class,
)
from sim.actuators import HW_OVERLOAD, MODE_MIT, Actuators
from sim.can_emulator import MitCanEmulator

R = MitRanges(p_max=12.5, v_max=30.0, t_max=10.0, kp_max=500.0, kd_max=5.0)  # DM-J4310
Q_QUANTUM, V_QUANTUM, T_QUANTUM = 25 / 65535, 60 / 4095, 20 / 4095
_channels = itertools.count()


def channel() -> str:
    return f"duet-test-{next(_channels)}"


def centre(u: int, lo: float, hi: float, bits: int) -> float:
    """The value in the middle of code u (immune to the last-bit rounding of lo + u*q)."""
    return lo + (u + 0.5) * (hi - lo) / ((1 << bits) - 1)


# -- codec ------------------------------------------------------------------------------------


def test_truncation_matches_the_firmware_vector_from_issue_12() -> None:
    # DM-J4310 ranges, p = v = 1, kp = 10, kd = 0.5, t = 1: the firmware and every reference
    # truncate; rounding to nearest would give 8A 3D 84 40 52 19 A8 CC
    assert pack_command(1, 1, 10, 0.5, 1, R) == bytes.fromhex("8A3C8430511998CC")


def test_command_decodes_to_the_lower_edge_of_its_code() -> None:
    rng = np.random.default_rng(0)
    for _ in range(500):
        p, v, t = rng.uniform(-12.5, 12.5), rng.uniform(-30, 30), rng.uniform(-10, 10)
        kp, kd = rng.uniform(0, 500), rng.uniform(0, 5)
        out = unpack_command(pack_command(p, v, kp, kd, t, R), R)
        quanta = (Q_QUANTUM, V_QUANTUM, 500 / 4095, 5 / 4095, T_QUANTUM)
        for got, want, q in zip(out, (p, v, kp, kd, t), quanta, strict=True):
            assert want - q - 1e-9 <= got <= want + 1e-9


def test_range_edges_and_bit_layout() -> None:
    assert pack_command(12.5, 30.0, 500.0, 5.0, 10.0, R) == bytes([0xFF] * 8)
    assert pack_command(-12.5, -30.0, 0.0, 0.0, -10.0, R) == bytes(8)
    assert unpack_command(bytes([0xFF] * 8), R) == (12.5, 30.0, 500.0, 5.0, 10.0)
    # p = 0x1234, v = 0x567, kp = 0x89A, kd = 0xBCD, t = 0xEF0
    raw = bytes([0x12, 0x34, 0x56, 0x78, 0x9A, 0xBC, 0xDE, 0xF0])
    fields = (centre(0x1234, -12.5, 12.5, 16), centre(0x567, -30, 30, 12),
              centre(0x89A, 0, 500, 12), centre(0xBCD, 0, 5, 12), centre(0xEF0, -10, 10, 12))
    assert pack_command(*fields, R) == raw
    assert float_to_uint(fields[0], -12.5, 12.5, 16) == 0x1234
    buf = bytearray(6)
    pack_state_into(buf, 1, fields[0], fields[1], fields[4], R)
    assert bytes(buf[1:]) == bytes([0x12, 0x34, 0x56, 0x7E, 0xF0])
    p, _, t = unpack_state(buf, 1, R)
    assert p <= fields[0] < p + Q_QUANTUM and t <= fields[4] < t + T_QUANTUM


def test_out_of_range_values_clamp_and_nan_is_refused() -> None:
    assert pack_command(99.0, 1e9, 1e4, 50.0, float("inf"), R) == bytes([0xFF] * 8)
    assert pack_command(-99.0, -1e9, -3.0, -1.0, float("-inf"), R) == bytes(8)
    with pytest.raises(ValueError, match="NaN"):
        pack_command(float("nan"), 0, 0, 0, 0, R)


def test_bad_model_ids_and_dialect_choices_are_refused() -> None:
    with pytest.raises(ValueError, match="v_max"):
        MitRanges(12.5, 0.0, 10.0)
    with pytest.raises(ValueError, match="p_max"):
        MitRanges(float("inf"), 1.0, 10.0)
    with pytest.raises(ValueError, match="distinct"):
        MitCanBus(JOINTS, [1, 1, 2, 3, 4, 5], R, [1] * N_JOINTS, [0] * N_JOINTS,
                  interface="virtual")
    with pytest.raises(ValueError, match="kp must be in"):
        MitCanBus(JOINTS, IDS, R, [600] * N_JOINTS, [0] * N_JOINTS, interface="virtual")
    with pytest.raises(ValueError, match="low 4 bits"):
        MitCanBus(JOINTS, [1, 2, 3, 4, 5, 17], R, [1] * N_JOINTS, [0] * N_JOINTS, dialect="damiao")
    with pytest.raises(ValueError, match=r"1\.\.32"):
        MitCanBus(JOINTS, [1, 2, 3, 4, 5, 40], R, [1] * N_JOINTS, [0] * N_JOINTS,
                  dialect="myactuator")
    with pytest.raises(ValueError, match="classic CAN only"):
        MitCanBus(JOINTS, IDS, R, [1] * N_JOINTS, [0] * N_JOINTS, dialect="cubemars", fd=True)
    with pytest.raises(ValueError, match="unknown MIT dialect 'odrive'"):
        MitCanBus(JOINTS, IDS, R, [1] * N_JOINTS, [0] * N_JOINTS, dialect="odrive")
    with pytest.raises(ValueError, match="timeout_ms"):
        MitCanBus(JOINTS, IDS, R, [1] * N_JOINTS, [0] * N_JOINTS, timeout_ms=float("inf"))


# -- MitCanBus on a virtual bus with a scripted motor side (the generic dialect) -------------


class Motors:
    """The far end of a virtual bus, answering each command frame as the test scripts it."""

    def __init__(self, ch: str) -> None:
        self.bus = can.Bus(interface="virtual", channel=ch)
        self.dialect = GenericDialect(IDS)

    def take(self, n: int) -> list[can.Message]:
        frames = [self.bus.recv(1.0) for _ in range(n)]
        assert all(f is not None for f in frames)
        return frames  # type: ignore[return-value]

    def reply(self, motor_id: int, p: float, t: float = 0.0, arb_id: int = 0) -> None:
        _, data = self.dialect.state_reply(IDS.index(motor_id), p, 0.0, t, 0, 0.0, R)
        self.bus.send(can.Message(arbitration_id=arb_id, is_extended_id=False, data=data))


def open_bus(ch: str, timeout_ms: float = 2.0, master_ids: list[int] | None = None,
             direction: list[int] | None = None) -> MitCanBus:
    bus = MitCanBus(JOINTS, IDS, R, [20.0] * N_JOINTS, [1.0] * N_JOINTS, interface="virtual",
                    channel=ch, timeout_ms=timeout_ms, master_ids=master_ids, direction=direction)
    bus.open()
    return bus


def test_replies_are_matched_by_id_in_any_order() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch)
    try:
        bus.write(np.zeros(N_JOINTS))
        frames = motors.take(6)
        assert [f.arbitration_id for f in frames] == IDS
        for motor_id in reversed(IDS):
            motors.reply(motor_id, 0.1 * motor_id)
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(out.q, [0.1 * i for i in IDS], atol=Q_QUANTUM)
        assert bus.stats.missing_replies == 0 and bus.stats.reads == 1
        assert np.isnan(out.temperature_c).all()  # the generic reply has none
    finally:
        bus.close()
        motors.bus.shutdown()


def test_master_ids_match_replies_by_arbitration_id() -> None:
    ch = channel()
    masters = [0x11, 0x12, 0x13, 0x14, 0x15, 0x16]
    motors, bus = Motors(ch), open_bus(ch, master_ids=masters)
    try:
        bus.write(np.zeros(N_JOINTS))
        motors.take(6)
        for j in (3, 0, 5, 1, 4, 2):  # the first data byte names motor 1: only the id counts
            motors.reply(1, 0.5 + j, arb_id=masters[j])
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(out.q, 0.5 + np.arange(N_JOINTS), atol=Q_QUANTUM)
    finally:
        bus.close()
        motors.bus.shutdown()


def test_missing_reply_is_counted_and_names_the_motor() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch, timeout_ms=20.0)
    try:
        bus.write(np.zeros(N_JOINTS))
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
        bus.write(np.zeros(N_JOINTS))
        motors.take(6)
        for motor_id in IDS:
            motors.reply(motor_id, 1.0)
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(out.q, 1.0, atol=Q_QUANTUM)
        assert bus.late_replies == 1
    finally:
        bus.close()
        motors.bus.shutdown()



@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_a_frame_whose_dlc_exceeds_its_data_is_counted_and_dropped(dialect: str) -> None:
    """python-can takes a frame's dlc and data from the interface unchecked: a reply claiming 8
    bytes and holding fewer was an IndexError in the dialects' and the codec's decoding (a
    crash of the follower's tick). Each is dropped and counted; the real replies still count."""
    ch = channel()
    motors = can.Bus(interface="virtual", channel=ch)
    d = dialect_class(dialect)(IDS)
    bus = MitCanBus(JOINTS, IDS, R, [20.0] * N_JOINTS, [1.0] * N_JOINTS, dialect=dialect,
                    timeout_ms=500.0, bus=can.Bus(interface="virtual", channel=ch))
    try:
        bus.write(np.zeros(N_JOINTS))
        assert all(motors.recv(1.0) is not None for _ in IDS)
        short = 0
        for j in range(N_JOINTS):
            arb, data = d.state_reply(j, 0.1 * j, 0.0, 0.0, 0, 30.0, R)
            for keep in range(len(data)):  # every truncation of every motor's reply
                motors.send(can.Message(arbitration_id=arb, is_extended_id=False,
                                        dlc=len(data), data=data[:keep]))
                short += 1
        for j in range(N_JOINTS):
            arb, data = d.state_reply(j, 0.1 * j, 0.0, 0.0, 0, 30.0, R)
            motors.send(can.Message(arbitration_id=arb, is_extended_id=False, data=data))
        out = MotorState(N_JOINTS)
        bus.read(out)
        np.testing.assert_allclose(out.q, 0.1 * np.arange(N_JOINTS), atol=Q_QUANTUM)
        assert bus.stats.dropped_frames == {"dlc beyond its data": short}
        assert bus.stats.errors == 0
    finally:
        bus.close()
        bus._bus.shutdown()  # type: ignore[union-attr]  # passed in: the test owns it
        motors.shutdown()


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_a_remote_frame_is_neither_a_reply_nor_a_command(dialect: str) -> None:
    """A remote frame has a dlc and no data: the dialects went by the dlc, so one with dlc 8 on
    Damiao's control id was an IndexError in register_value (host) and classify (motor side),
    found by atheris (tests/fuzz_decoders.py, target mit_can). They go by the data now."""
    d = dialect_class(dialect)(IDS)
    for arb in range(0x800):
        remote = can.Message(arbitration_id=arb, is_extended_id=False, is_remote_frame=True,
                             dlc=8)
        assert d.motor_of(remote) == -1
        assert all(d.register_value(remote, j, rid) is None for j in range(N_JOINTS)
                   for rid in (21, 22, 23))
        assert d.classify(remote) == ("", -1)


def test_the_emulator_drops_a_command_whose_dlc_exceeds_its_data(rig: Rig) -> None:
    """The motor end too: a truncated command (or Damiao control frame) was a ValueError or
    IndexError that ended the emulator's serving thread."""
    bus = rig.bus()
    bus.open()
    d = dialect_class(rig.dialect)(IDS)
    peer = can.Bus(interface="virtual", channel=rig.ch)
    try:
        arbs = [d.command_id(j) for j in range(N_JOINTS)]
        arbs += [getattr(d, "CONTROL_ID", 0x7FF), getattr(d, "SERVO_BASE", 0x140) + IDS[0]]
        for arb in arbs:
            peer.send(can.Message(arbitration_id=arb, is_extended_id=False, dlc=8, data=b"\x01"))
        deadline = time.monotonic() + 2.0
        while rig.emu.ignored < len(arbs) and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rig.emu.ignored == len(arbs)
        bus.read(MotorState(N_JOINTS))  # still serving
    finally:
        peer.shutdown()

@pytest.mark.parametrize(
    ("field", "value", "match"),
    [("q", float("nan"), "q_target = nan"), ("q", float("inf"), "q_target = inf"),
     ("q", 13.0, r"q_target = 13.0 .*\[-12.5, 12.5\]"), ("kp", -1.0, "kp = -1.0"),
     ("kd", float("nan"), "kd = nan"), ("tau_ff", 10.5, r"tau_ff = 10.5 .*\[-10, 10\]")])
def test_write_refuses_nonfinite_or_out_of_range_with_command_error(
        field: str, value: float, match: str) -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch)
    try:
        args = {"q": np.zeros(N_JOINTS), "kp": np.full(N_JOINTS, 20.0), "kd": np.ones(N_JOINTS),
                "tau_ff": np.zeros(N_JOINTS)}
        args[field][4] = value
        with pytest.raises(CommandError, match=match) as err:
            bus.write(args["q"], kp=args["kp"], kd=args["kd"], tau_ff=args["tau_ff"])
        assert err.value.motor == "wrist_roll" and "wrist_roll (id 5)" in str(err.value)
        assert motors.bus.recv(0.05) is None  # nothing reached the wire
        assert bus.stats.writes == 0
    finally:
        bus.close()
        motors.bus.shutdown()


def test_generic_start_up_query_is_followed_at_once_by_a_hold_at_the_reconstructed_goal() -> None:
    """The Katz protocol has no status frame: the query (zero gains) and, one round trip
    later, a hold at q + tau/kp with the configured gains; later reads repeat the hold."""
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch, timeout_ms=500.0)
    seen: list[can.Message] = []
    tau = [1.0, -4.0, 0.0, 0.0, 0.0, 9.0]  # motors 2 and 6 far off: the jump is bounded

    def answer() -> None:  # motors holding 0.3 rad under load, reporting that load
        while (f := motors.bus.recv(1.0)) is not None:
            seen.append(f)
            motors.reply(f.arbitration_id, 0.3, t=tau[f.arbitration_id - 1])

    responder = threading.Thread(target=answer)
    responder.start()
    try:
        out = MotorState(6)
        bus.read(out)
        assert len(seen) == 12
        for f in seen[:6]:
            _, _, kp, kd, t = unpack_command(f.data, R)
            assert kp == 0.0 and kd == 0.0 and abs(t) <= T_QUANTUM
        step = np.clip(np.array(tau) / 20.0, -0.1, 0.1)  # kp 20, hold_jump_max_rad 0.1
        # q, tau and kd*dq are estimated to half a code each (tau and kd*dq divided by kp);
        # the hold goes out rounded to the nearest code: half a code more
        tol = Q_QUANTUM + (T_QUANTUM + 1.0 * V_QUANTUM) / 2 / 20.0
        for j, f in enumerate(seen[6:]):
            p, _, kp, _, _ = unpack_command(f.data, R)
            assert abs(p - (0.3 + step[j])) <= tol and abs(kp - 20.0) <= 500 / 4095
        assert bus.hold_jumps_clipped == 2
        goal = np.zeros(N_JOINTS)
        assert bus.present_goal(goal) is False  # torque state unknown after a restart
        np.testing.assert_allclose(goal, 0.3 + step, atol=tol)
        bus.read(out)
        assert len(seen) == 24  # present_goal and the read repeat the hold, nothing else
        assert all(bytes(f.data) == bytes(seen[6 + j % 6].data) for j, f in enumerate(seen[12:]))
        assert bus.stats.errors == 0 and bus.late_replies == 0
    finally:
        bus.close()
        responder.join()
        motors.bus.shutdown()


# -- MitCanBus <-> MitCanEmulator, every dialect ----------------------------------------------


def _motors_answer_enables(motors: Motors, lost: dict[int, int]) -> list[int]:
    """The motor side of an enable (and the hold command after it): each frame answered, but
    `lost[id]` of that motor's first enable answers never come back. The ids of the enable
    frames received, in order."""
    seen: list[int] = []
    while True:
        frame = motors.bus.recv(0.5)
        if frame is None:
            return seen
        if frame.data == ENTER_MOTOR_MODE:
            seen.append(frame.arbitration_id)
            if lost.get(frame.arbitration_id, 0) > 0:
                lost[frame.arbitration_id] -= 1
                continue
        motors.reply(frame.arbitration_id, 0.0)


def test_a_lost_enable_answer_is_asked_again_only_of_that_motor() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch, timeout_ms=50.0)
    seen: list[int] = []
    side = threading.Thread(target=lambda: seen.extend(_motors_answer_enables(motors, {3: 1})))
    side.start()
    try:
        bus.enable_torque(True)
        side.join()
        assert seen == [*IDS, 3]
        assert bus.stats.retries == 1 and bus.stats.errors == 0
    finally:
        bus.close()
        motors.bus.shutdown()


def test_a_motor_that_never_answers_the_enable_is_named_after_every_attempt() -> None:
    ch = channel()
    motors, bus = Motors(ch), open_bus(ch, timeout_ms=50.0)
    seen: list[int] = []
    side = threading.Thread(target=lambda: seen.extend(_motors_answer_enables(motors, {3: 99})))
    side.start()
    try:
        with pytest.raises(BusError, match=r"elbow \(id 3\)"):
            bus.enable_torque(True)
        side.join()
        assert seen == [*IDS, 3, 3]
        assert bus.stats.retries == 2 and bus.stats.errors == 1
    finally:
        bus.close()
        motors.bus.shutdown()


class Rig:
    def __init__(self, dialect: str, fd: bool = False, registers: dict[int, float] | None = None,
                 direction: list[int] | None = None) -> None:
        self.ch = channel()
        self.dialect = dialect
        self.fd = fd
        self.direction = direction
        self.act = Actuators(N_JOINTS)
        self.act.q[:] = [0.1, -0.2, 0.3, -0.4, 0.5, 0.6]
        self.act.dq[:] = [1.0, -1.0, 0.5, 0.0, 0.0, 0.0]
        self.act.tau[:] = [2.0, -3.0, 0.0, 0.0, 15.0, 0.0]  # joint 5 beyond t_max
        self.emu = MitCanEmulator(self.act, IDS, R, can.Bus(interface="virtual", channel=self.ch),
                                  dialect=dialect, registers=registers)
        self.emu.start()
        self.buses: list[MitCanBus] = []

    def bus(self, kp: float = 20.0, kd: float = 1.0) -> MitCanBus:
        bus = MitCanBus(JOINTS, IDS, R, [kp] * N_JOINTS, [kd] * N_JOINTS, interface="virtual",
                        channel=self.ch, timeout_ms=200.0, dialect=self.dialect, fd=self.fd,
                        direction=self.direction)
        self.buses.append(bus)
        return bus

    def close(self) -> None:
        for bus in self.buses:
            bus.close()
        self.emu.stop()


@pytest.fixture(params=sorted(DIALECTS))
def rig(request: pytest.FixtureRequest):
    r = Rig(request.param, direction=[1, 1, 1, 1, 1, -1])
    yield r
    r.close()


def test_bus_and_emulator_round_trip(rig: Rig) -> None:
    act, bus = rig.act, rig.bus()
    bus.open()
    out = MotorState(6)
    bus.read(out)
    sign = np.array([1, 1, 1, 1, 1, -1])
    np.testing.assert_allclose(out.q, act.q * sign, atol=Q_QUANTUM + 1e-4)
    if rig.dialect != "myactuator":  # its state query reports the angle only
        np.testing.assert_allclose(out.dq, act.dq * sign, atol=V_QUANTUM)
        assert out.effort[4] == pytest.approx(10.0, abs=T_QUANTUM)  # clamped at t_max
    assert out.t_ns > 0
    assert not act.torque_enabled.any()  # queries never enable anything

    if rig.dialect != "myactuator":  # there a command is what enables
        bus.write(np.full(N_JOINTS, 0.25))  # before motor mode: answered, not applied
        bus.read(out)
        assert not act.goal_q.any()

    bus.enable_torque(True)
    assert act.torque_enabled.all() and (act.mode == MODE_MIT).all()
    target = np.array([0.5, -0.5, 1.0, -1.0, 0.2, 0.4])
    bus.write(target, kd=np.full(N_JOINTS, 0.5), tau_ff=np.full(N_JOINTS, 1.5),
              dq_target=np.full(N_JOINTS, 2.0))
    bus.read(out)
    with act.lock:  # the motors see joint 6 mirrored (direction -1)
        np.testing.assert_allclose(act.goal_q * sign, target, atol=Q_QUANTUM)
        np.testing.assert_allclose(act.kp, 20.0, atol=500 / 4095)
        np.testing.assert_allclose(act.kd, 0.5, atol=5 / 4095)
        np.testing.assert_allclose(act.tau_ff * sign, 1.5, atol=T_QUANTUM)
        np.testing.assert_allclose(act.goal_dq * sign, 2.0, atol=V_QUANTUM)
    assert bus.stats.errors == 0

    bus.enable_torque(False)
    assert not act.torque_enabled.any()
    bus.read(out)  # a read with torque off turns nothing back on (MyActuator: no command)
    assert not act.torque_enabled.any()


def test_a_state_query_is_answered_from_the_physics_snapshot_without_the_lock() -> None:
    """The sim's motors answer like hardware: a reply never waits for the actuator lock (the
    physics may hold it, or be descheduled holding it, on a busy host)."""
    rig = Rig("damiao")  # its read is a status query: nothing to apply
    try:
        bus = rig.bus()
        bus.open()
        q = np.array([0.2, -0.1, 0.05, 0.7, -0.3, 0.0])
        rig.act.publish_present(q, np.zeros(N_JOINTS), np.zeros(N_JOINTS))  # a physics step
        out = MotorState(6)
        with rig.act.lock:  # held for the whole read: a reply taking it would time out
            bus.read(out)
        np.testing.assert_allclose(out.q, q, atol=Q_QUANTUM)
        assert bus.stats.errors == 0
    finally:
        rig.close()



def test_an_enabled_motors_command_is_applied_without_the_lock(rig: Rig) -> None:
    """The per-tick command of a motor in MIT mode takes no actuator lock (the sim's physics may
    be descheduled holding it): it is applied and answered while the lock is held."""
    act, bus = rig.act, rig.bus()
    bus.open()
    bus.enable_torque(True)
    act.publish_present(act.q, act.dq, act.tau)  # a physics step: replies need no lock
    target = np.array([0.5, -0.5, 1.0, -1.0, 0.2, -0.4])
    out = MotorState(6)
    with act.lock:
        bus.write(target)
        bus.read(out)
        np.testing.assert_allclose(act.goal_q * [1, 1, 1, 1, 1, -1], target, atol=Q_QUANTUM)
    assert bus.stats.errors == 0

def test_silent_emulated_motor_raises_naming_it(rig: Rig) -> None:
    bus = rig.bus()
    bus.open()
    bus.timeout_s = 0.03
    rig.act.silent[1] = True
    with pytest.raises(BusError, match=r"shoulder \(id 2\)"):
        bus.read(MotorState(6))
    assert bus.stats.missing_replies == 1


def test_emulator_ignores_frames_for_other_ids(rig: Rig) -> None:
    peer = can.Bus(interface="virtual", channel=rig.ch)
    try:
        peer.send(can.Message(arbitration_id=0x40, is_extended_id=False, data=ENTER_MOTOR_MODE))
        peer.send(can.Message(arbitration_id=1, is_extended_id=False, data=EXIT_MOTOR_MODE[:6]))
        deadline = time.monotonic() + 1.0
        while rig.emu.ignored < 2 and time.monotonic() < deadline:
            time.sleep(0.005)
        assert rig.emu.ignored == 2 and rig.emu.replies_out == 0
    finally:
        peer.shutdown()


@pytest.mark.parametrize(("dialect", "fault"), [("damiao", "overload"),
                                                 ("cubemars", "over-current")])
def test_an_injected_fault_is_a_motor_fault_naming_motor_and_error(dialect: str,
                                                                   fault: str) -> None:
    rig = Rig(dialect)
    try:
        bus = rig.bus()
        bus.open()
        bus.enable_torque(True)
        out = MotorState(6)
        bus.write(np.zeros(N_JOINTS))
        bus.read(out)
        with rig.act.lock:  # what the sim's fault socket does for {"cmd": "overload"}
            rig.act.hw_error[2] |= HW_OVERLOAD
            rig.act.torque_enabled[2] = False
        bus.write(np.zeros(N_JOINTS))
        with pytest.raises(MotorFault, match=rf"elbow \(id 3\): {fault}") as err:
            bus.read(out)
        assert err.value.motor == "elbow"
        assert out.error_flags[2] != 0 and not out.error_flags[[0, 1, 3, 4, 5]].any()
        if dialect == "damiao":  # FB clears the latched fault; the motor stays off
            assert out.error_flags[2] == 0xE
            bus.clear_errors()
            bus.write(np.zeros(N_JOINTS))
            bus.read(out)
            assert not out.error_flags.any() and not rig.act.torque_enabled[2]
        else:
            with pytest.raises(BusError, match="no frame for clearing"):
                bus.clear_errors()
    finally:
        rig.close()


def test_temperatures_are_reported_where_the_dialect_has_them() -> None:
    for dialect, want in (("damiao", 47.0), ("cubemars", 47.0), ("generic", np.nan)):
        rig = Rig(dialect)
        try:
            rig.act.temperature_c[:] = 47.0
            bus = rig.bus()
            bus.open()
            out = MotorState(6)
            bus.read(out)
            np.testing.assert_array_equal(out.temperature_c, np.full(N_JOINTS, want))
        finally:
            rig.close()


def test_damiao_refuses_a_motor_whose_range_registers_differ() -> None:
    rig = Rig("damiao", registers={22: 45.0})  # the motor maps velocity over +-45 rad/s
    try:
        bus = rig.bus()
        with pytest.raises(BusError, match=r"base_yaw \(id 1\): the motor's VMAX \(register 22\)"
                                           r" is 45 but model.v_max is 30") as err:
            bus.open()
        assert err.value.motor == "base_yaw"
        assert not rig.act.torque_enabled.any()
    finally:
        rig.close()
    rig = Rig("damiao")
    try:
        rig.act.silent[3] = True
        with pytest.raises(BusError, match=r"wrist_pitch \(id 4\): no reply to reading register"
                                           r" PMAX \(21\)"):
            rig.bus().open()
    finally:
        rig.close()


def test_damiao_over_can_fd() -> None:
    rig = Rig("damiao", fd=True)
    try:
        bus = rig.bus()
        bus.open()
        bus.enable_torque(True)
        bus.write(np.full(N_JOINTS, 0.2))
        out = MotorState(6)
        bus.read(out)
        np.testing.assert_allclose(rig.act.goal_q, 0.2, atol=Q_QUANTUM)
        assert all(f.is_fd and f.bitrate_switch for f in bus._frames)
        # 6 x (56.8 us command + 56.8 us reply) at 1 / 5 Mbit/s: 682 us vs 1620 us classic
        assert bus.wire_time_us() == pytest.approx(6 * 2 * 56.8)
    finally:
        rig.close()


def test_myactuator_shutdown_is_acknowledged_and_zero_is_refused() -> None:
    rig = Rig("myactuator")
    try:
        bus = rig.bus()
        bus.open()
        bus.enable_torque(True)
        assert rig.act.torque_enabled.all()
        bus.enable_torque(False)
        assert not rig.act.torque_enabled.any()
        with pytest.raises(BusError, match="no frame for setting the zero position"):
            bus.zero_position()
    finally:
        rig.close()


# -- restarts: a new process opening the bus must not change what the motors do ---------------


def settle(act: Actuators, steps: int = 200) -> None:
    """The motors' MIT law under a constant load (gravity-like), integrated to rest: each
    joint ends at the steady-state error kp (goal - q) = load."""
    load = np.array([0.0, 3.0, 2.0, 1.0, 0.5, 0.2])
    for _ in range(steps):
        with act.lock:
            live = act.torque_enabled & (act.hw_error == 0)
            tau = act.kp * (act.goal_q - act.q) + act.kd * (act.goal_dq - act.dq) + act.tau_ff
            tau = np.where(live, tau, 0.0)
            act.q[:] = np.where(live, act.q + 0.2 * (tau - load) / np.maximum(act.kp, 1e-9),
                                act.q)
            act.dq[:] = 0.0
            act.tau[:] = tau


@pytest.mark.parametrize("dialect", sorted(DIALECTS))
def test_restart_reports_the_goal_held_and_moves_nothing(dialect: str) -> None:
    rig = Rig(dialect)
    try:
        first = rig.bus(kp=40.0, kd=1.0)
        first.open()
        first.enable_torque(True)
        goal = np.array([0.2, 0.5, -0.3, 0.1, 0.0, 0.4])
        first.write(goal)
        first.read(MotorState(6))
        settle(rig.act)
        own = np.zeros(N_JOINTS)
        assert first.present_goal(own) is True  # this process turned torque on
        np.testing.assert_array_equal(own, goal)
        first.close()  # the follower dies: the motors keep running their last command
        with rig.act.lock:
            q_before, goal_before = rig.act.q.copy(), rig.act.goal_q.copy()
        sag = goal_before - q_before
        assert sag[1] > 0.05  # a real steady-state error, as under gravity

        second = rig.bus(kp=40.0, kd=1.0)
        second.open()
        held = np.zeros(N_JOINTS)
        on = second.present_goal(held)
        with rig.act.lock:
            goal_after = rig.act.goal_q.copy()
        if dialect == "myactuator":  # no torque in its state query: the measured position
            assert on is False
            np.testing.assert_allclose(held, q_before, atol=1e-4)
            np.testing.assert_array_equal(goal_after, goal_before)
        else:
            assert on is (dialect == "damiao")  # only Damiao reports torque on
            # the motors hold the written goal truncated to its code (<= 1 code below it);
            # the estimate is good to half a code of q, tau/kp and kd dq/kp each
            est = (Q_QUANTUM + (T_QUANTUM + V_QUANTUM) / 40.0) / 2
            assert np.all(goal_before <= goal + 1e-12)
            assert np.all(goal_before > goal - Q_QUANTUM - 1e-12)
            np.testing.assert_allclose(held, goal_before, atol=est)
            # Damiao's refresh changed nothing; generic/CubeMars re-held the same code
            np.testing.assert_allclose(goal_after, goal_before, atol=1e-12 + (
                0 if dialect == "damiao" else Q_QUANTUM))
        second.write(held)
        second.enable_torque(True)
        second.read(MotorState(6))
        settle(rig.act)
        with rig.act.lock:
            moved = np.abs(rig.act.q - q_before)
        if dialect == "myactuator":
            assert moved[1] > 0.05  # documented: it re-holds the measured position
        else:
            assert moved.max() < 1e-3, moved
    finally:
        rig.close()


def test_present_goal_of_a_motor_that_is_off_is_its_measured_position() -> None:
    rig = Rig("damiao")
    try:
        bus = rig.bus()
        bus.open()
        out = np.zeros(N_JOINTS)
        assert bus.present_goal(out) is False
        np.testing.assert_allclose(out, rig.act.q, atol=Q_QUANTUM)
        bus.enable_torque(True)
        bus.write(np.full(N_JOINTS, 0.3))
        bus.read(MotorState(6))
        bus.enable_torque(False)
        assert bus.present_goal(out) is False
        np.testing.assert_allclose(out, rig.act.q, atol=Q_QUANTUM)
    finally:
        rig.close()


def test_wire_time_is_two_frames_per_motor() -> None:
    bus = MitCanBus(JOINTS, IDS, R, [1] * N_JOINTS, [0] * N_JOINTS, interface="virtual",
                    bitrate=1_000_000)
    assert bus.wire_time_us() == pytest.approx(N_JOINTS * (135 + 115))
    damiao = MitCanBus(JOINTS, IDS, R, [1] * N_JOINTS, [0] * N_JOINTS, dialect="damiao",
                       interface="virtual")
    assert damiao.wire_time_us() == pytest.approx(N_JOINTS * (135 + 135))  # 8-byte replies
