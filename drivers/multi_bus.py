"""One `MotorBus` over several: a robot with a bus per limb, each owning a slice of the joints.

The parts are separate wires, each with its own budget. `write` sends every part's commands
before anything waits, so MIT-mode parts (whose `write` only sends) run their wires in
parallel and `read` then collects each part's replies; Dynamixel parts transact in turn.
Joint order is the robot's: each part's slice is scattered into, and gathered from, the
joint-order arrays through preallocated index arrays (no allocation per tick).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from drivers.bus import BusError, BusStats, CommandError, MotorBus, MotorState


class MultiBus:
    """`MotorBus` over `parts`: (bus, index of each of its motors in `joint_names`)."""

    def __init__(self, joint_names: Sequence[str], parts: Sequence[tuple[MotorBus, Sequence[int]]]
                 ) -> None:
        n = len(joint_names)
        owned = sorted(k for _, idx in parts for k in idx)
        if owned != list(range(n)):
            raise ValueError(f"MultiBus: the parts must drive each of the {n} joints once,"
                             f" got indices {owned}")
        for bus, idx in parts:
            if list(bus.joint_names) != [joint_names[k] for k in idx]:
                raise ValueError(f"MultiBus: a part drives {bus.joint_names}, not"
                                 f" {[joint_names[k] for k in idx]}")
        self.joint_names = list(joint_names)
        self.parts = [bus for bus, _ in parts]
        self._index = [np.asarray(idx, dtype=np.intp) for _, idx in parts]
        self._states = [MotorState(len(idx)) for _, idx in parts]
        self._q = [np.zeros(len(idx)) for _, idx in parts]
        self._kp = [np.zeros(len(idx)) for _, idx in parts]
        self._kd = [np.zeros(len(idx)) for _, idx in parts]
        self._tau = [np.zeros(len(idx)) for _, idx in parts]
        self._goal = [np.zeros(len(idx)) for _, idx in parts]
        self._finite = np.zeros(n, dtype=bool)
        self._stats = BusStats(per_motor_errors={name: 0 for name in joint_names})

    @property
    def stats(self) -> BusStats:
        """The parts' counters, summed (refreshed in place on each access)."""
        total = self._stats
        for name in ("errors", "retries", "crc_errors", "timeouts", "missing_replies"):
            setattr(total, name, sum(getattr(bus.stats, name) for bus in self.parts))
        total.dropped_frames.clear()
        for bus in self.parts:
            total.per_motor_errors.update(bus.stats.per_motor_errors)
            for reason, count in bus.stats.dropped_frames.items():
                total.dropped_frames[reason] = total.dropped_frames.get(reason, 0) + count
        # a tick reads (and writes) every part once: count ticks, not part transactions
        total.reads = min(bus.stats.reads for bus in self.parts)
        total.writes = min(bus.stats.writes for bus in self.parts)
        return total

    def open(self) -> None:
        opened: list[MotorBus] = []
        try:
            for bus in self.parts:
                bus.open()
                opened.append(bus)
        except BusError:
            for bus in opened:
                bus.close()
            raise

    def close(self) -> None:
        for bus in self.parts:
            bus.close()

    def enable_torque(self, on: bool) -> None:
        """Every part; turning torque off reaches every part before a failure is raised."""
        failure: BusError | None = None
        for bus in self.parts:
            try:
                bus.enable_torque(on)
            except BusError as exc:
                if on:
                    raise
                failure = failure or exc
        if failure is not None:
            raise failure

    def recover(self, motors: list[str]) -> None:
        for bus in self.parts:
            mine = [m for m in motors if m in bus.joint_names]
            if mine:
                bus.recover(mine)

    def read(self, out: MotorState) -> None:
        t_ns = 0
        for bus, idx, state in zip(self.parts, self._index, self._states, strict=True):
            try:
                bus.read(state)
            finally:  # a MotorFault comes with the state filled: keep it
                np.put(out.q, idx, state.q)
                np.put(out.dq, idx, state.dq)
                np.put(out.effort, idx, state.effort)
                np.put(out.error_flags, idx, state.error_flags)
                np.put(out.temperature_c, idx, state.temperature_c)
            t_ns = state.t_ns if not t_ns else min(t_ns, state.t_ns)  # the oldest sample
        out.t_ns = t_ns

    def write(
        self,
        q_target: np.ndarray,
        kp: np.ndarray | None = None,
        kd: np.ndarray | None = None,
        tau_ff: np.ndarray | None = None,
    ) -> None:
        """Every part's slice. A non-finite value anywhere is refused before any part sends
        (each part refuses its own out-of-limit values before it sends)."""
        for name, arr in (("q_target", q_target), ("kp", kp), ("kd", kd), ("tau_ff", tau_ff)):
            if arr is None:
                continue
            np.isfinite(arr, out=self._finite)
            if not self._finite.all():
                k = int(np.argmin(self._finite))
                raise CommandError(f"{self.joint_names[k]}: {name} = {arr[k]} is not finite",
                                   self.joint_names[k])
        for p, (bus, idx) in enumerate(zip(self.parts, self._index, strict=True)):
            np.take(q_target, idx, out=self._q[p])
            bus.write(self._q[p],
                      None if kp is None else np.take(kp, idx, out=self._kp[p]),
                      None if kd is None else np.take(kd, idx, out=self._kd[p]),
                      None if tau_ff is None else np.take(tau_ff, idx, out=self._tau[p]))

    def present_goal(self, out: np.ndarray) -> bool:
        on = True
        for bus, idx, goal in zip(self.parts, self._index, self._goal, strict=True):
            on = bus.present_goal(goal) and on
            np.put(out, idx, goal)
        return on

    def wire_time_us(self) -> float:
        """The slowest part: the wires run side by side."""
        return max(bus.wire_time_us() for bus in self.parts)
