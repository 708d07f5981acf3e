"""MultiBus: a robot with a bus per limb, against two emulated Damiao CAN FD buses."""

from __future__ import annotations

import itertools

import can
import numpy as np
import pytest
from sim_arm import JOINTS, N_JOINTS

from drivers.bus import BusError, CommandError, MotorState
from drivers.can_mit import MitCanBus
from drivers.mit_codec import MitRanges
from drivers.multi_bus import MultiBus
from sim.actuators import MODE_MIT, Actuators
from sim.can_emulator import MitCanEmulator

R = MitRanges(12.5, 30.0, 10.0)
# interleaved on purpose: the limbs need not be contiguous in joint order
LIMBS = [[0, 2, 4], [1, 3, 5]]
Q = 25 / 65535
_channels = itertools.count()


@pytest.fixture
def rig():
    act = Actuators(N_JOINTS)
    act.q[:] = [0.1, -0.2, 0.3, -0.4, 0.5, 0.6]
    emus, parts = [], []
    for limb in LIMBS:
        ch = f"duet-multi-{next(_channels)}"
        ids = [k + 1 for k in limb]
        emu = MitCanEmulator(act, ids, R, can.Bus(interface="virtual", channel=ch),
                             dialect="damiao", joints=limb)
        emu.start()
        emus.append(emu)
        parts.append((MitCanBus([JOINTS[k] for k in limb], ids, R, [20.0] * 3, [1.0] * 3,
                                dialect="damiao", interface="virtual", channel=ch, fd=True,
                                timeout_ms=200.0), limb))
    bus = MultiBus(JOINTS, parts)
    bus.open()
    yield act, bus
    bus.close()
    for emu in emus:
        emu.stop()


def test_reads_and_writes_scatter_and_gather_in_joint_order(rig) -> None:
    act, bus = rig
    out = MotorState(6)
    bus.read(out)
    np.testing.assert_allclose(out.q, act.q, atol=Q)
    bus.enable_torque(True)
    assert act.torque_enabled.all() and (act.mode == MODE_MIT).all()
    target = np.array([0.5, -0.5, 1.0, -1.0, 0.2, 0.4])
    bus.write(target, kp=np.arange(N_JOINTS) + 10.0)
    bus.read(out)
    np.testing.assert_allclose(act.goal_q, target, atol=Q)
    np.testing.assert_allclose(act.kp, np.arange(N_JOINTS) + 10.0, atol=500 / 4095)
    assert bus.stats.reads == 2 and bus.stats.writes == 1 and bus.stats.errors == 0
    goal = np.zeros(N_JOINTS)
    assert bus.present_goal(goal) is True
    np.testing.assert_array_equal(goal, target)
    assert bus.wire_time_us() == pytest.approx(3 * 2 * 56.8)  # the wires run side by side
    bus.enable_torque(False)
    assert not act.torque_enabled.any()


def test_a_nonfinite_command_is_refused_before_any_part_sends(rig) -> None:
    act, bus = rig
    bus.enable_torque(True)
    before = act.goal_q.copy()
    q = np.zeros(N_JOINTS)
    q[5] = np.nan
    with pytest.raises(CommandError, match="gripper: q_target = nan") as err:
        bus.write(q)
    assert err.value.motor == "gripper"
    np.testing.assert_array_equal(act.goal_q, before)


def test_a_silent_motor_on_one_limb_names_it(rig) -> None:
    act, bus = rig
    bus.parts[1].timeout_s = 0.03  # type: ignore[attr-defined]
    act.silent[3] = True
    with pytest.raises(BusError, match=r"wrist_pitch \(id 4\)"):
        bus.read(MotorState(6))
    assert bus.stats.missing_replies == 1 and bus.stats.per_motor_errors["wrist_pitch"] == 1


def test_parts_must_cover_every_joint_once() -> None:
    part = MitCanBus(JOINTS[:3], [1, 2, 3], R, [1] * 3, [0] * 3, interface="virtual")
    with pytest.raises(ValueError, match="each of the 6 joints once"):
        MultiBus(JOINTS, [(part, [0, 1, 2])])
    with pytest.raises(ValueError, match="drives"):
        MultiBus(JOINTS[:3], [(part, [2, 1, 0])])
