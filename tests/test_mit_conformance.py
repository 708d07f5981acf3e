"""MIT-mode dialects, byte for byte against implementations nobody here wrote.

- generic (Katz firmware): mini-cheetah-motor-driver-socketcan 0.4.3 (PyPI), its own frames
  captured at its socket-send call and its own decoder fed our replies;
- Damiao: damiao-motor 1.0.6 (PyPI, python-can) on a real python-can virtual bus, and
  pydamiao 0.1.4 (PyPI, derived from Damiao's official SDK);
- CubeMars: motor-python 0.0.11 (PyPI; "AK80-6 V2" MIT limits from the CubeMars manual);
- MyActuator: no MIT-mode package exists; transcribed from "MYACTUATOR Servo Motor Control
  Protocol V4.2" (2024.05), §5 "Motion Mode Control Command_CAN (0x400 + ID)", example 1,
  and §2.12 "Read Multi-Turn Angle Command (0x92)".
"""

from __future__ import annotations

import itertools
import math

import can
import numpy as np
import pytest

from drivers.mit_codec import MitRanges, pack_command, unpack_command
from drivers.mit_dialects import (
    CLEAR_ERROR,
    ENTER_MOTOR_MODE,
    EXIT_MOTOR_MODE,
    ZERO_POSITION,
    CubeMarsDialect,
    DamiaoDialect,
    GenericDialect,
    MyActuatorDialect,
    Reply,
)

_channels = itertools.count()


def inputs(r: MitRanges, n: int = 400, seed: int = 0) -> list[tuple[float, ...]]:
    """(p, v, kp, kd, t): the range edges, zero, out-of-range values, and random ones."""
    rng = np.random.default_rng(seed)
    fixed = [(0.0, 0.0, 0.0, 0.0, 0.0), (r.p_max, r.v_max, r.kp_max, r.kd_max, r.t_max),
             (-r.p_max, -r.v_max, 0.0, 0.0, -r.t_max), (1.0, 1.0, 10.0, 0.5, 1.0),
             (2 * r.p_max, -2 * r.v_max, 0.5 * r.kp_max, 0.1, 2 * r.t_max)]
    rand = [(rng.uniform(-r.p_max, r.p_max), rng.uniform(-r.v_max, r.v_max),
             rng.uniform(0, r.kp_max), rng.uniform(0, r.kd_max), rng.uniform(-r.t_max, r.t_max))
            for _ in range(n)]
    return fixed + [tuple(float(x) for x in c) for c in rand]


def msg(arb: int, data: bytes) -> can.Message:
    return can.Message(arbitration_id=arb, is_extended_id=False, data=data)


# -- generic: mini-cheetah-motor-driver-socketcan 0.4.3 ----------------------------------------


@pytest.fixture
def cheetah():
    from motor_driver import canmotorlib  # mini-cheetah-motor-driver-socketcan

    # AK80-9 V2 firmware ranges (direction +1); no socket is opened: frames are captured
    motor = canmotorlib.CanMotorController.__new__(canmotorlib.CanMotorController)
    canmotorlib.CanMotorController.__init__(motor, "duet-none", 1, "AK80_9_V2")
    sent: list[bytes] = []
    replies: list[bytes] = []
    motor._send_can_frame = lambda data: sent.append(bytes(data))
    motor._recv_can_frame = lambda: (0, len(replies[-1]), replies[-1])
    p = motor.motorParams
    r = MitRanges(p["P_MAX"], p["V_MAX"], p["T_MAX"], p["KP_MAX"], p["KD_MAX"])
    return motor, sent, replies, r


def test_generic_commands_and_replies_match_mini_cheetah_driver(cheetah) -> None:
    motor, sent, replies, r = cheetah
    dialect = GenericDialect([1])
    out = Reply()
    for p, v, kp, kd, t in inputs(r):
        state = dialect.state_reply(0, p, v, t, 0, 0.0, r)[1]  # what our motor side answers
        replies.append(state)
        pos, vel, torque = motor.send_rad_command(p, v, kp, kd, t)
        assert sent[-1] == pack_command(p, v, kp, kd, t, r), (p, v, kp, kd, t)
        dialect.parse(msg(0, state), r, out)  # both decode our reply alike
        assert (pos, vel, torque) == pytest.approx((out.p, out.v, out.t), abs=1e-12)
    # the special frames (its enable sends zero first, then enter)
    sent.clear()
    replies.append(dialect.state_reply(0, 0.0, 0.0, 0.0, 0, 0.0, r)[1])
    motor.enable_motor()
    motor.disable_motor()
    motor.set_zero_position()
    assert sent[0] == ZERO_POSITION and sent[1] == ENTER_MOTOR_MODE
    assert sent[3] == EXIT_MOTOR_MODE and sent[4] == ZERO_POSITION
    assert dialect.enable(0) == (1, ENTER_MOTOR_MODE)
    assert dialect.disable(0) == (1, EXIT_MOTOR_MODE) and dialect.zero(0) == (1, ZERO_POSITION)


def test_generic_vector_from_issue_12() -> None:
    # DM-J4310 ranges: truncation (the firmware's) gives 8A 3C 84 30 51 19 98 CC
    r = MitRanges(12.5, 30.0, 10.0)
    assert pack_command(1.0, 1.0, 10.0, 0.5, 1.0, r).hex(" ") == "8a 3c 84 30 51 19 98 cc"


# -- Damiao: damiao-motor 1.0.6 and pydamiao 0.1.4 ---------------------------------------------


@pytest.fixture
def damiao():
    from damiao_motor.core import motor as motor_mod

    ch = f"duet-conformance-{next(_channels)}"
    host = can.Bus(interface="virtual", channel=ch)
    wire = can.Bus(interface="virtual", channel=ch)
    motor = motor_mod.DaMiaoMotor(3, 0x13, host, motor_type="4310")  # DM-J4310: 12.5/30/10
    yield motor, wire
    host.shutdown()
    wire.shutdown()


def test_damiao_frames_match_damiao_motor_on_a_real_bus(damiao) -> None:
    motor, wire = damiao
    r = MitRanges(12.5, 30.0, 10.0)
    ours = DamiaoDialect([3], [0x13])
    for p, v, kp, kd, t in inputs(r):
        motor.send_raw(motor.encode_cmd_msg(p, v, t, kp, kd))
        frame = wire.recv(1.0)
        assert frame is not None and frame.arbitration_id == ours.command_id(0) == 3
        assert bytes(frame.data) == pack_command(p, v, kp, kd, t, r), (p, v, kp, kd, t)
    expected: list[tuple[int, bytes] | None] = [
        ours.enable(0), ours.disable(0), ours.zero(0), ours.clear_error(0), ours.query(0),
        ours.read_register(0, 21), ours.read_register(0, 22), ours.read_register(0, 23)]
    for send in (motor.enable, motor.disable, motor.set_zero_position, motor.clear_error,
                 motor.request_motor_feedback, lambda: motor.request_register_reading(21),
                 lambda: motor.request_register_reading(22),
                 lambda: motor.request_register_reading(23)):
        send()
        frame = wire.recv(1.0)
        assert frame is not None
        assert (frame.arbitration_id, bytes(frame.data)) == expected.pop(0)
    assert ours.enable(0)[1] == ENTER_MOTOR_MODE and ours.clear_error(0)[1] == CLEAR_ERROR
    assert ours.query(0) == (0x7FF, bytes([0x03, 0x00, 0xCC, 0, 0, 0, 0, 0]))


def test_damiao_motor_decodes_our_replies(damiao) -> None:
    motor, _ = damiao
    r = MitRanges(12.5, 30.0, 10.0)
    ours = DamiaoDialect([3], [0x13])
    out = Reply()
    codes = [0x0, 0x1, 0x8, 0x9, 0xA, 0xB, 0xC, 0xD, 0xE]
    for k, (p, v, _, _, t) in enumerate(inputs(r, n=100)):
        code, temp = codes[k % len(codes)], 20.0 + k % 80
        arb, data = ours.state_reply(0, p, v, t, code, temp, r)
        theirs = motor.decode_sensor_feedback(data, arbitration_id=arb)
        ours.parse(msg(arb, data), r, out)
        assert theirs["can_id"] == 3 and theirs["status_code"] == out.code == code
        assert (theirs["pos"], theirs["vel"], theirs["torq"]) == pytest.approx(
            (out.p, out.v, out.t), abs=1e-12)
        assert theirs["t_mos"] == theirs["t_rotor"] == out.temperature_c == temp
        assert (ours.fault(code) is None) == (theirs["status"] in ("DISABLED", "ENABLED"))
    for rid, value in ((21, 12.5), (22, 30.0), (23, 10.0), (22, 45.0)):
        arb, data = ours.register_reply(0, rid, value)
        motor.decode_register_reply(data, arbitration_id=arb)
        assert motor.registers[rid] == value == ours.register_value(msg(arb, data), 0, rid)


def test_damiao_frames_match_pydamiao_official_sdk_derivative() -> None:
    from pydamiao import protocol, structs

    sdk = protocol.DamiaoProtocol
    limits = structs.MotorLimits(12.5, 30.0, 10.0)
    r = MitRanges(12.5, 30.0, 10.0)
    ours = DamiaoDialect([3])

    def payload(bridge: bytes) -> tuple[int, bytes]:
        # its USB-CAN bridge frame: header 4, count 4, interval 4, 1, can id (LE) 4, 4, data 8
        return int.from_bytes(bridge[13:17], "little"), bytes(bridge[21:29])

    for p, v, kp, kd, t in inputs(r):
        assert payload(sdk.encode_mit_control(3, limits, kp, kd, p, v, t)) == (
            3, pack_command(p, v, kp, kd, t, r)), (p, v, kp, kd, t)
    assert payload(sdk.encode_basic_command(3, sdk.ENABLE_CMD)) == ours.enable(0)
    assert payload(sdk.encode_basic_command(3, sdk.DISABLE_CMD)) == ours.disable(0)
    assert payload(sdk.encode_basic_command(3, sdk.SET_ZERO_CMD)) == ours.zero(0)
    assert payload(sdk.encode_basic_command(3, sdk.CLEAN_ERROR_CMD)) == ours.clear_error(0)
    assert payload(sdk.encode_refresh_state(3)) == ours.query(0)
    for rid in (21, 22, 23):
        assert payload(sdk.encode_read_param(3, rid)) == ours.read_register(0, rid)
    out = Reply()
    for p, v, _, _, t in inputs(r, n=100):
        _, data = ours.state_reply(0, p, v, t, 0xB, 61.0, r)
        ours.parse(msg(0, data), r, out)
        assert sdk.decode_status(data, limits) == pytest.approx((out.p, out.v, out.t), abs=1e-5)
        assert int(sdk.decode_fault(data)) == out.code == 0xB
        assert sdk.decode_temperatures(data) == (61, 61)


# -- CubeMars: motor-python 0.0.11 ---------------------------------------------------------------


def test_cubemars_frames_and_replies_match_motor_python() -> None:
    from loguru import logger
    from motor_python import cube_mars_motor_can as cm

    logger.disable("motor_python")  # no CAN interface here: it logs that and stays offline
    motor = cm.CubeMarsAK806v2CAN(motor_can_id=5, interface="duet-none")
    lim = motor._mit_limits  # AK80-6 V2 (manual p. 42): p 12.56, v 76, t 12, kp 500, kd 5
    r = MitRanges(lim.p_max, lim.v_max, lim.t_max, lim.kp_max, lim.kd_max)
    ours = CubeMarsDialect([5])
    out = Reply()
    for p, v, kp, kd, t in inputs(r):
        assert motor.pack_mit_frame(p, v, kp, kd, t) == pack_command(p, v, kp, kd, t, r), (
            p, v, kp, kd, t)
    for k, (p, v, _, _, t) in enumerate(inputs(r, n=100)):
        code, temp = k % 7, float(k % 120 - 20)
        arb, data = ours.state_reply(0, p, v, t, code, temp, r)
        theirs = motor._parse_feedback_msg(can.Message(arbitration_id=5, is_extended_id=False,
                                                       data=data))
        ours.parse(msg(arb, data), r, out)
        assert theirs.position_degrees == pytest.approx(math.degrees(out.p), abs=1e-9)
        assert theirs.current_amps == pytest.approx(out.t, abs=1e-12)
        assert theirs.temperature_celsius == out.temperature_c == temp
        assert theirs.error_code == out.code == code
    assert motor._CAN_HELPER_ENABLE == ours.enable(0)[1] == ENTER_MOTOR_MODE
    assert ours.disable(0)[1] == motor._CAN_HELPER_DISABLE
    assert ours.zero(0)[1] == motor._CAN_HELPER_ZERO_POSITION


def test_cubemars_temperature_byte_is_celsius_plus_40() -> None:
    """Issue 21 #18: byte 6 of an MIT reply is °C + 40, per TMotor's support (quoted in
    neurobionics/TMotorCANControl PR #4) and motor-python 0.0.11; TMotorCANControl's mit_can.py
    reads it raw, 40 °C high (a room-temperature motor at 65 °C). The manual V1.0.8 §5.3 names
    the byte "Motor temperature" and says no more (drivers/mit_dialects.py has the quotes)."""
    r = MitRanges(12.5, 50.0, 18.0)
    ours, out = CubeMarsDialect([5]), Reply()
    arb, data = ours.state_reply(0, 0.0, 0.0, 0.0, 0, 25.0, r)
    assert data[6] == 65  # what an AK motor at 25 °C sends
    ours.parse(msg(arb, data[:6] + bytes([0, 0])), r, out)
    assert out.temperature_c == -40.0  # the byte's floor
    ours.parse(msg(arb, data[:6] + bytes([180, 0])), r, out)
    assert out.temperature_c == 140.0  # the firmware's over-temperature protection


# -- MyActuator: transcribed from the vendor's protocol document V4.2 --------------------------


def test_myactuator_matches_protocol_v4_2_example() -> None:
    """§5.4 example 1: ids 0x401/0x501; p -12.5..12.5 rad, v -45..45 rad/s, t -24..24 N·m."""
    r = MitRanges(12.5, 45.0, 24.0)
    ours = MyActuatorDialect([1])
    command = bytes.fromhex("E66682E052333B55")  # p 0xE666, v 0x82E, kp 0x052, kd 0x333, t 0xB55
    p, v, kp, kd, t = unpack_command(command, r)
    # the document's decoded values, to its printed precision (it truncates its printed digits
    # and divides p by 65536: 9.99 where /65535 gives 9.9998)
    assert p == pytest.approx(9.99, abs=0.011)
    assert (v, kp, kd, t) == pytest.approx((1.021, 10.012, 1.0, 10.004), abs=0.0011)
    centre = [x + q / 2 for x, q in zip((p, v, kp, kd, t), (25 / 65535, 90 / 4095, 500 / 4095,
                                                            5 / 4095, 48 / 4095), strict=True)]
    assert pack_command(*centre, r) == command
    assert ours.command_id(0) == 0x401
    reply = bytes.fromhex("01E66582EB550000")  # reply 0x501 (DATA[6..7] NULL)
    out = Reply()
    assert ours.motor_of(msg(0x501, reply)) == 0 and ours.parse(msg(0x501, reply), r, out)
    assert out.p == pytest.approx(9.99, abs=0.011)
    assert (out.v, out.t) == pytest.approx((1.021, 10.004), abs=0.0011)
    arb, data = ours.state_reply(0, out.p + 12.5e-5, out.v + 1e-5, out.t + 1e-5, 0, 0.0, r)
    assert (arb, data) == (0x501, reply)
    # §2.12: read multi-turn angle, 0x141 -> 0x241, int32 0.01 deg/LSB in DATA[4..7]
    assert ours.query(0) == (0x141, bytes([0x92, 0, 0, 0, 0, 0, 0, 0]))
    angle = msg(0x241, bytes([0x92, 0, 0, 0]) + (36000).to_bytes(4, "little", signed=True))
    assert ours.parse(angle, r, out) and out.p == pytest.approx(2 * math.pi)
    assert ours.disable(0) == (0x141, bytes([0x80, 0, 0, 0, 0, 0, 0, 0]))
