"""`duet reset` off the loop's thread: reopening a bus and reading the motors takes longer than
a tick, so it runs on a worker while the loop keeps its deadlines and skips bus traffic. The
core decides whether the reset is accepted (runtime/follower/core.py `reset`); this only does
the I/O, in two phases."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from drivers.bus import BusError, CommandError, MotorBus, MotorState
from runtime.follower.core import FollowerCore
from runtime.ipc.rpc import Deferred


class ResetJob:
    """A reset on a worker thread: reopen a dead bus, clear the hardware error of the motors
    named (`duet reboot`), read the motors and the goal they hold; then, if torque was off,
    hold the measured position and enable torque."""

    def __init__(self, bus: MotorBus, state: MotorState, core: FollowerCore,
                 deferred: Deferred, recover: list[str] | None = None) -> None:
        self.bus, self.state, self.core, self.deferred = bus, state, core, deferred
        self.recover = recover or []  # motors to clear a latched hardware error of first
        self.q = np.zeros(state.n)
        self.goal = np.zeros(state.n)
        self.torque_on = False
        self.error: str | None = None
        self.phase = 1
        self.estops_at_start = core.estops  # an estop meanwhile wins over the reset
        self.done = threading.Event()
        self._start(self._read)

    def _start(self, target: Any) -> None:
        self.done.clear()
        threading.Thread(target=target, name="duet-reset", daemon=True).start()

    def _read(self) -> None:
        try:
            if self.core.bus_dead:
                self.bus.close()
                self.bus.open()
            if self.recover:  # `duet reboot`: torque is off on those motors after it
                try:
                    self.bus.recover(self.recover)
                except BusError as exc:
                    self.error = f"{', '.join(self.recover)} not recovered: {exc}"
                    self.done.set()
                    return
            self.bus.read(self.state)
            self.q[:] = self.state.q
            self.torque_on = self.bus.present_goal(self.goal)
        except BusError as exc:
            self.error = f"bus not back: {exc}"
        self.done.set()

    def enable(self, command: np.ndarray) -> None:
        """Phase 2: the core accepted the reset; hold its command and enable torque."""
        self.phase = 2
        self._command = command.copy()
        self._start(self._enable)

    def _enable(self) -> None:
        try:
            self.bus.write(self._command)
            self.bus.enable_torque(True)
            self.torque_on = True
        except (BusError, CommandError) as exc:
            self.error = f"torque not enabled: {exc}"
        self.done.set()
