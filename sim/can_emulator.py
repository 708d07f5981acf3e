"""Emulated MIT-mode CAN motors for the sim, answering on a real python-can bus.

Runs in the sim process (a thread), apart from the follower: the follower's `MitCanBus`
talks to it over the same wire format a real Damiao/CubeMars motor speaks. Each frame to a
motor's id is answered by one 6-byte reply (id, position, velocity, torque) from the shared
`Actuators`:
- enter motor mode -> mode MODE_MIT, torque enabled; exit -> torque off;
- zero position -> the present position becomes the motor's zero (kept by the emulator);
- a command -> goal_q, goal_dq, kp, kd, tau_ff, applied only in motor mode (as real
  firmware does) but answered in any mode.
A silent motor (`actuators.silent`) answers nothing. Torque beyond the model's t_max is
reported clamped at t_max, as the 12-bit field saturates on a real motor.
"""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any

import can
import numpy as np

from drivers.can_loopback import peer_channel
from drivers.can_mit import (
    COMMAND_DLC,
    ENTER_MOTOR_MODE,
    EXIT_MOTOR_MODE,
    ZERO_POSITION,
    MitRanges,
    pack_reply,
    unpack_command,
)
from sim.actuators import MODE_MIT, Actuators

HOST_ID = 0  # arbitration id of replies when no master ids are configured (Katz firmware)


class MitCanEmulator:
    def __init__(
        self,
        actuators: Actuators,
        ids: list[int],
        model: Any,
        bus: can.BusABC,
        master_ids: list[int] | None = None,
    ) -> None:
        if len(ids) != actuators.n:
            raise ValueError(f"MIT emulator: {actuators.n} actuators need {actuators.n} ids,"
                             f" got {len(ids)}")
        if master_ids is not None and len(master_ids) != len(ids):
            raise ValueError("MIT emulator: master_ids must match ids")
        self.actuators = actuators
        self.ids = list(ids)
        self.ranges = MitRanges.of(model)
        self.bus = bus
        self._index = {motor_id: j for j, motor_id in enumerate(ids)}
        self._reply_ids = list(master_ids) if master_ids is not None else [HOST_ID] * len(ids)
        self._zero = np.zeros(actuators.n)  # joint position of each motor's encoder zero
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rt_priority = 0  # SCHED_FIFO priority of the serving thread, 0 = don't ask
        self.frames_in = 0
        self.replies_out = 0
        self.ignored = 0  # frames to other ids or malformed

    @classmethod
    def from_config(cls, actuators: Actuators, bus_cfg: Any) -> MitCanEmulator:
        """Open the motor end of the follower's link (bus config like runtime's CanBusConfig).

        duet-udp: the peer of the follower's channel. Any other interface: the same channel
        (a real or virtual CAN bus is shared by all nodes).
        """
        channel = bus_cfg.channel
        if bus_cfg.interface == "duet-udp":
            channel = peer_channel(channel)
        bus = can.Bus(interface=bus_cfg.interface, channel=channel, bitrate=bus_cfg.bitrate)
        return cls(actuators, bus_cfg.ids, bus_cfg.model, bus, bus_cfg.master_ids)

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
                self.handle(msg)

    def handle(self, msg: can.Message) -> None:
        """Apply one frame to the actuators and send the reply (if the motor speaks)."""
        j = self._index.get(msg.arbitration_id)
        if j is None or msg.is_extended_id or msg.is_remote_frame or msg.dlc != COMMAND_DLC:
            self.ignored += 1
            return
        self.frames_in += 1
        data = bytes(msg.data)
        a = self.actuators
        with a.lock:
            if data == ENTER_MOTOR_MODE:
                a.mode[j] = MODE_MIT
                a.torque_enabled[j] = True
                # entering motor mode must not pull toward a stale target: hold where it is
                a.goal_q[j], a.goal_dq[j], a.kp[j], a.kd[j], a.tau_ff[j] = a.q[j], 0, 0, 0, 0
            elif data == EXIT_MOTOR_MODE:
                a.torque_enabled[j] = False
            elif data == ZERO_POSITION:
                self._zero[j] = a.q[j]
            else:
                p, v, kp, kd, t = unpack_command(data, self.ranges)
                if a.torque_enabled[j] and a.mode[j] == MODE_MIT:
                    a.goal_q[j] = p + self._zero[j]
                    a.goal_dq[j], a.kp[j], a.kd[j], a.tau_ff[j] = v, kp, kd, t
            if a.silent[j]:
                return
            reply = pack_reply(self.ids[j] & 0xFF, a.q[j] - self._zero[j], a.dq[j], a.tau[j],
                               self.ranges)
        self.bus.send(can.Message(arbitration_id=self._reply_ids[j], is_extended_id=False,
                                  data=reply))
        self.replies_out += 1
