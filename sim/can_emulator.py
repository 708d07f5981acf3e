"""Emulated MIT-mode CAN motors for the sim, answering on a real python-can bus.

Runs in the sim process (a thread), apart from the follower: the follower's `MitCanBus`
talks to it in the wire format of the configured dialect (drivers/mit_dialects.py; the same
class frames both ends). Each frame to a motor is answered like the motor's firmware does,
from the shared `Actuators`:
- enable (Damiao/Katz/CubeMars FC) -> motor mode, torque on; a motor entering it holds where
  it is with zero gains until commanded; enabling an enabled motor changes nothing;
- disable -> torque off; zero -> the present position becomes the motor's zero;
- a command -> goal_q, goal_dq, kp, kd, tau_ff, applied only with torque on (a MyActuator
  motion command turns torque on: that protocol has no enable frame) but answered always;
- a status query (Damiao refresh, MyActuator angle read) and a register read (Damiao PMAX,
  VMAX, TMAX, from the model or `registers`) -> answered, nothing changes;
- clear error (Damiao FB) -> the latched fault is cleared, torque stays off.
A reply carries the dialect's status: Damiao's nibble is 1 with torque on, 0 off, or the code
of a latched sim fault (`actuators.hw_error`, injected through the sim's fault socket); CubeMars
reports the fault in its error byte; generic and MyActuator replies carry no status. A silent
motor (`actuators.silent`) answers nothing. Torque beyond the model's t_max is reported clamped
at t_max, as the 12-bit field saturates on a real motor. Replies are CAN FD with bit-rate
switching when the request was.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Sequence
from typing import Any

import can
import numpy as np

from drivers.can_loopback import peer_channel
from drivers.mit_codec import MitRanges, unpack_command
from drivers.mit_dialects import MitDialect, dialect_class, malformed
from runtime.ipc.stats import Histogram
from sim.actuators import (
    HW_ELECTRICAL_SHOCK,
    HW_ENCODER,
    HW_INPUT_VOLTAGE,
    HW_OVERHEATING,
    HW_OVERLOAD,
    MODE_MIT,
    Actuators,
)

# sim fault bits (Dynamixel's Hardware Error Status layout) -> the dialects' fault names
_FAULT_NAMES = ((HW_OVERLOAD, "overload"), (HW_OVERHEATING, "overheating"),
                (HW_ELECTRICAL_SHOCK, "electrical shock"), (HW_INPUT_VOLTAGE, "input voltage"),
                (HW_ENCODER, "motor encoder"))
# the frames that change a motor (under the actuator lock, but for an enabled motor's command)
_CHANGES = frozenset(("enable", "disable", "clear", "command"))


class MitCanEmulator:
    def __init__(
        self,
        actuators: Actuators,
        ids: list[int],
        model: Any,
        bus: can.BusABC,
        master_ids: list[int] | None = None,
        *,
        dialect: str = "generic",
        joints: Sequence[int] | None = None,
        registers: dict[int, float] | None = None,
    ) -> None:
        joints = list(joints) if joints is not None else list(range(actuators.n))
        if len(ids) != len(joints) or not all(0 <= k < actuators.n for k in joints):
            raise ValueError(f"MIT emulator: {len(joints)} actuators {joints} need as many"
                             f" ids, got {len(ids)}")
        self.actuators = actuators
        self.joints = joints  # actuator index of each motor
        self.ids = list(ids)
        self.ranges = MitRanges.of(model)
        self.dialect: MitDialect = dialect_class(dialect)(ids, master_ids)
        self.bus = bus
        # the motor's stored registers (Damiao: the range registers follow the model)
        stored = {rid: float(getattr(self.ranges, key))
                  for key, rid in self.dialect.range_registers.items()}
        stored.update(registers or {})
        self.registers = [dict(stored) for _ in ids]
        self._zero = np.zeros(len(ids))  # joint position of each motor's encoder zero
        self._present = np.zeros((3, actuators.n))  # (q, dq, tau) read for a reply
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.reply_us = Histogram(lowest=1.0)  # service time per frame in, µs
        self.rt_priority = 0  # SCHED_FIFO priority of the serving thread, 0 = don't ask
        self.frames_in = 0
        self.replies_out = 0
        self.ignored = 0  # frames to other ids or malformed

    @classmethod
    def from_config(cls, actuators: Actuators, bus_cfg: Any,
                    joints: Sequence[int] | None = None) -> MitCanEmulator:
        """Open the motor end of the follower's link (bus config like runtime's CanBusConfig).

        duet-udp: the peer of the follower's channel. Any other interface: the same channel
        (a real or virtual CAN bus is shared by all nodes).
        """
        channel = bus_cfg.channel
        if bus_cfg.interface == "duet-udp":
            channel = peer_channel(channel)
        kwargs: dict[str, Any] = {"fd": True, "data_bitrate": bus_cfg.data_bitrate} \
            if bus_cfg.fd else {}
        bus = can.Bus(interface=bus_cfg.interface, channel=channel, bitrate=bus_cfg.bitrate,
                      **kwargs)
        return cls(actuators, bus_cfg.ids, bus_cfg.model, bus, bus_cfg.master_ids,
                   dialect=bus_cfg.dialect, joints=joints)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("MIT emulator already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._serve, name="mit-can-emulator", daemon=True)
        self._thread.start()

    def stop(self, close_bus: bool = True) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None
        if close_bus:
            self.bus.shutdown()

    def _serve(self) -> None:
        if self.rt_priority:
            # motors answer a command within microseconds whatever the host is doing
            # (best effort; without the privilege it simply runs SCHED_OTHER)
            with contextlib.suppress(OSError):
                os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(self.rt_priority))
        while not self._stop.is_set():
            try:
                msg = self.bus.recv(0.05)  # short timeout: stop() is noticed promptly
            except can.CanOperationError:
                if self._stop.is_set():
                    return
                raise
            if msg is not None:
                t_in = time.monotonic_ns()
                self.handle(msg)
                self.reply_us.add((time.monotonic_ns() - t_in) / 1000.0)

    def fault_code(self, j: int) -> int:
        """The dialect's code for motor j's latched sim fault, 0 when none (or unreported)."""
        bits = int(self.actuators.hw_error[self.joints[j]])
        codes = self.dialect.fault_codes
        for bit, name in _FAULT_NAMES:
            if bits & bit and name in codes:
                return codes[name]
        return 0

    def handle(self, msg: can.Message) -> None:
        """Apply one frame to the actuators and send the reply (if the motor speaks).

        Only a frame that changes the motor's state takes the actuator lock; the reply's position,
        velocity and torque come from the physics' newest whole step (`read_present`), so an
        answer never waits for the physics, as the serial emulators' do not."""
        kind, j = ("", -1) if malformed(msg) else self.dialect.classify(msg)
        if j < 0:
            self.ignored += 1
            return
        self.frames_in += 1
        a, d, k = self.actuators, self.dialect, self.joints[j]
        reply = None
        if kind == "register":
            rid = msg.data[3]
            if rid not in self.registers[j]:
                return  # the firmware ignores unknown registers
            reply = d.register_reply(j, rid, self.registers[j][rid])
        elif kind == "zero":
            a.read_present(self._present)
            self._zero[j] = self._present[0, k]
        elif kind == "command" and a.torque_enabled[k] and a.mode[k] == MODE_MIT:
            # the per-tick frame of an enabled motor: lock-free float64 stores (a physics step
            # between two of them mixes two commands for 1 ms), so the reply never waits for
            # a sim thread holding the actuator lock while it lost the CPU
            p, v, kp, kd, t = unpack_command(msg.data, self.ranges)
            a.goal_q[k] = p + self._zero[j]
            a.goal_dq[k], a.kp[k], a.kd[k], a.tau_ff[k] = v, kp, kd, t
        elif kind in _CHANGES:
            with a.lock:
                if kind == "enable":
                    if not a.torque_enabled[k] and not a.hw_error[k]:
                        a.mode[k] = MODE_MIT
                        a.torque_enabled[k] = True
                        # entering motor mode must not pull toward a stale target: zero gains
                        a.goal_q[k], a.goal_dq[k], a.kp[k], a.kd[k], a.tau_ff[k] = \
                            a.q[k], 0, 0, 0, 0
                elif kind == "disable":
                    a.torque_enabled[k] = False
                    reply = d.ack_reply(j, bytes(msg.data))
                elif kind == "clear":
                    a.hw_error[k] = 0
                else:  # a command
                    p, v, kp, kd, t = unpack_command(msg.data, self.ranges)
                    if d.enable(j) is None and not a.hw_error[k]:  # a command is the enable
                        a.mode[k], a.torque_enabled[k] = MODE_MIT, True
                    if a.torque_enabled[k] and a.mode[k] == MODE_MIT:
                        a.goal_q[k] = p + self._zero[j]
                        a.goal_dq[k], a.kp[k], a.kd[k], a.tau_ff[k] = v, kp, kd, t
        if a.silent[k]:
            return
        if reply is None:
            code = self.fault_code(j) or (1 if a.torque_enabled[k] else 0)
            if not d.reports_torque_state:
                code = self.fault_code(j)
            a.read_present(self._present)
            q, dq, tau = self._present[:, k].tolist()
            state = (j, q - float(self._zero[j]), dq, tau, code, float(a.temperature_c[k]),
                     self.ranges)
            reply = d.query_reply(*state) if kind == "query" else d.state_reply(*state)
        arb, data = reply
        self.bus.send(can.Message(arbitration_id=arb, is_extended_id=False, data=data,
                                  is_fd=msg.is_fd, bitrate_switch=msg.bitrate_switch))
        self.replies_out += 1
