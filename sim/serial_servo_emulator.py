"""The servo emulator both serial families run on (sim/dynamixel_emulator.py: Protocol 2.0,
sim/feetech_emulator.py: FT-SCS): servos with ids on one pty (sim/pty_server.py), joint i of
the shared `Actuators` behind servo ids[i], each with its register table.

What is alike lives here: the lifecycle (open at power-on or with power kept, serve, cut the
line), the instruction dispatch (SYNC READ and SYNC WRITE to many servos, replies in the
request's id order; unicast and broadcast, silent servos), the line noise on the replies, and
the table <-> physics plumbing (goal ticks to goal_q, present values from the newest physics
step, torque cut by a latched fault). A family gives its codec (`proto`), its table layout and
defaults, how it encodes positions and present values, which instructions it answers, and its
gain map.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from types import ModuleType
from typing import Any, ClassVar

import numpy as np

from sim.actuators import Actuators
from sim.pty_server import PtyServer, flip_byte

Reply = tuple[int, bytes]  # (status error, status params)


class SerialServoEmulator:
    """Servos with ids `ids`, joint i of `actuators` behind servo ids[i]; a family subclasses
    it."""

    proto: ClassVar[ModuleType]  # the family's wire codec (drivers/*_protocol.py)
    table_size: ClassVar[int]  # bytes of the modelled register table
    addr_id: ClassVar[int]
    addr_torque: ClassVar[int]  # Torque Enable
    addr_return_level: ClassVar[int]  # Status Return Level
    head_bytes: ClassVar[int]  # a READ's / SYNC's address and length
    thread_name: ClassVar[str]

    def __init__(self, actuators: Actuators, ids: Sequence[int],
                 zero_ticks: Sequence[int] | None, direction: Sequence[int] | None,
                 seed: int, center_ticks: int, ticks_per_rad: float) -> None:
        n = len(ids)
        max_id = self.proto.MAX_ID
        if n != actuators.n:
            raise ValueError(f"{n} servo ids for {actuators.n} actuators")
        if len(set(ids)) != n or not all(0 <= i <= max_id for i in ids):
            raise ValueError(f"servo ids must be unique and in 0..{max_id}: {list(ids)}")
        self.actuators = actuators
        self.ticks_per_rad = ticks_per_rad
        self.zero_ticks = [float(z) for z in (zero_ticks if zero_ticks is not None
                                              else [center_ticks] * n)]
        self.direction = [float(d) for d in (direction if direction is not None else [1] * n)]
        if len(self.zero_ticks) != n or len(self.direction) != n:
            raise ValueError("zero_ticks and direction need one entry per servo")
        if any(abs(d) != 1 for d in self.direction):
            raise ValueError("direction entries must be +1 or -1")
        # line noise on the replies: each reply is hit with this probability, one byte flipped
        # anywhere (header and length included) or at `corrupt_byte`, on every servo or on
        # `corrupt_servos` (indices) only; its bits at random or `corrupt_bits`; for ever or
        # the next `corrupt_count` replies
        self.corrupt_probability = 0.0
        self.corrupt_byte: int | None = None
        self.corrupt_servos: frozenset[int] | None = None
        self.corrupt_bits: int | None = None
        self.corrupt_count: int | None = None
        self._rng = random.Random(seed)
        self.tables = [self._default_table(k, servo_id) for k, servo_id in enumerate(ids)]
        self._index_by_id = {servo_id: k for k, servo_id in enumerate(ids)}
        self.parser = self.proto.StreamParser()
        self.packets_served = 0
        self._present = np.zeros((3, n))  # (q, dq, tau) of the newest physics step
        self.server = PtyServer(self.answer, self.thread_name)

    # ---- the family's hooks ----------------------------------------------------------------

    def _default_table(self, k: int, servo_id: int) -> bytearray:
        """Servo k's register table out of the box."""
        raise NotImplementedError

    def _head(self, params: bytes) -> tuple[int, int, bytes] | None:
        """A SYNC READ's or SYNC WRITE's (address, length, the rest); None when too short."""
        raise NotImplementedError

    def _unicast(self, k: int, instr: int, params: bytes) -> Reply | None:
        """Apply an instruction to servo k: its status (None: it does not answer)."""
        raise NotImplementedError

    def _answers(self, k: int, instr: int) -> bool:
        """Whether servo k's Status Return Level lets it answer `instr`."""
        raise NotImplementedError

    def _status_error(self, k: int, error: int) -> int:
        """The error byte of servo k's status to an instruction that found `error`."""
        raise NotImplementedError

    def _write(self, k: int, addr: int, data: bytes) -> Any:
        raise NotImplementedError

    def _put_goal(self, k: int, ticks: int) -> None:
        """Goal Position of servo k in its table."""
        raise NotImplementedError

    def _goal_ticks(self, k: int) -> int:
        raise NotImplementedError

    def _apply_gains(self, k: int) -> None:  # lock held
        raise NotImplementedError

    def _cuts_torque(self, k: int) -> bool:
        """A latched fault of servo k that switches its torque off."""
        raise NotImplementedError

    def _holds_torque_off(self, k: int) -> bool:
        """A latched fault of servo k that keeps a Torque Enable write from turning it on."""
        return self._cuts_torque(k)

    def _put_present(self, k: int, q: float, dq: float, tau: float, temperature: float) -> None:
        """Servo k's present values (SI, joint side) into its table."""
        raise NotImplementedError

    # ---- lifecycle (the serving is PtyServer's) ---------------------------------------------

    @property
    def path(self) -> str:
        """The pty slave a serial driver opens (set by open())."""
        return self.server.path

    @property
    def rt_priority(self) -> int:
        return self.server.rt_priority

    @rt_priority.setter
    def rt_priority(self, value: int) -> None:
        self.server.rt_priority = value

    def open(self, powered: bool = False) -> str:
        """Create the pty; return the slave device path a serial driver opens.

        `powered`: the servos kept power while the line was down (a pulled cable): Goal
        Position continues from the actuators. Else power-on: Goal Position = present
        position (no jump on torque enable). Torque Enable is as the motors are.
        """
        path = self.server.open()
        with self.actuators.lock:
            for k, table in enumerate(self.tables):
                q = self.actuators.goal_q[k] if powered else None
                self._put_goal(k, self._q_to_ticks(k, q))
                table[self.addr_torque] = int(self.actuators.torque_enabled[k])
                self._apply_goal(k)
                self._apply_gains(k)
        return path

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def close_line(self) -> None:
        """Fault injection: the device disappears (the pty is closed from our side)."""
        self.stop()

    def answer(self, data: bytes) -> bytes:
        """Every status the bytes that arrived ask for (the serving thread's protocol half)."""
        self.parser.feed(data)
        out = bytearray()
        for packet in self.parser:
            self.packets_served += 1
            out += self.handle(packet)
        return bytes(out)

    # ---- instruction handling (public so tests can drive it without a pty) -----------------

    def handle(self, packet: Any) -> bytes:
        """Apply one instruction packet; return the status bytes to send (maybe empty)."""
        instr, params = self._instruction(packet)
        if instr == self.proto.SYNC_READ:
            return self._sync_read(params)
        if instr == self.proto.SYNC_WRITE:
            self._sync_write(params)
            return b""
        broadcast = packet.id == self.proto.BROADCAST_ID
        if broadcast:
            targets = list(range(len(self.tables)))
        elif packet.id in self._index_by_id:
            targets = [self._index_by_id[packet.id]]
        else:
            return b""
        out = bytearray()
        for k in targets:
            if self.actuators.silent[k]:
                continue
            reply = self._unicast(k, instr, params)
            # broadcast: only PING is answered (by every servo, in id order)
            if reply is not None and self._answers(k, instr) \
                    and (not broadcast or instr == self.proto.PING):
                out += self._status(k, *reply)
        return bytes(out)

    def _instruction(self, packet: Any) -> tuple[int, bytes]:
        """(instruction, params) of a packet addressed to the servos."""
        raise NotImplementedError

    def _status(self, k: int, error: int, params: bytes) -> bytes:
        packet = self.proto.status_packet(self.tables[k][self.addr_id],
                                          self._status_error(k, error), params)
        if self.corrupt_probability and (self.corrupt_servos is None or k in self.corrupt_servos) \
                and self.corrupt_count != 0 and self._rng.random() < self.corrupt_probability:
            if self.corrupt_count is not None:
                self.corrupt_count -= 1
            return bytes(flip_byte(packet, self._rng, self.corrupt_byte, self.corrupt_bits))
        return bytes(packet)

    def _in_table(self, addr: int, length: int) -> bool:
        return length > 0 and addr + length <= self.table_size

    def _sync_read(self, params: bytes) -> bytes:
        head = self._head(params)
        if head is None or not head[2]:
            return b""
        addr, length, ids = head
        if not self._in_table(addr, length):
            return b""
        silent = self.actuators.silent
        servos = [self._index_by_id.get(servo_id, -1) for servo_id in ids]
        servos = [k for k in servos if k >= 0 and not silent[k]]
        self._refresh_present(servos)
        out = bytearray()
        for k in servos:  # replies in the order of the request's id list
            out += self._status(k, 0, bytes(self.tables[k][addr : addr + length]))
        return bytes(out)

    def _sync_write(self, params: bytes) -> None:
        head = self._head(params)
        if head is None:
            return
        addr, length, body = head
        step = 1 + length
        if length == 0 or len(body) % step or self._sync_write_fast(addr, length, body):
            return
        for off in range(0, len(body), step):
            k = self._index_by_id.get(body[off])
            if k is not None and not self.actuators.silent[k]:
                self._write(k, addr, body[off + 1 : off + step])

    def _sync_write_fast(self, addr: int, length: int, body: bytes) -> bool:
        """A family's own path for the per-tick SYNC WRITE; True when it took it."""
        return False

    # ---- register table <-> physics (callers hold actuators.lock where noted) --------------

    def _q_to_ticks(self, k: int, q: float | None = None) -> int:
        """Ticks of joint position q (default: the present position)."""
        q = float(self.actuators.q[k]) if q is None else float(q)
        return round(self.zero_ticks[k] + self.direction[k] * q * self.ticks_per_rad)

    def _apply_written(self, k: int, goal: bool, renumbered: bool, torque: bool,
                       gains: bool) -> None:
        """What a write to servo k's table changed, into the physics. The goal (the per-tick
        write) takes no actuator lock: a sim thread holding it may have lost the CPU, and a
        reply must never wait for that. Torque Enable and the gains take it."""
        if goal:
            self._apply_goal(k)
        if renumbered:
            self._index_by_id = {t[self.addr_id]: i for i, t in enumerate(self.tables)}
        if not (torque or gains):
            return
        table, act = self.tables[k], self.actuators
        with act.lock:
            if torque:  # a latched fault keeps torque off until reboot, like the real servo
                on = table[self.addr_torque] != 0 and not self._holds_torque_off(k)
                table[self.addr_torque] = int(on)
                act.torque_enabled[k] = on
            if gains:
                self._apply_gains(k)

    def _apply_goal(self, k: int) -> None:
        # One aligned float64 store, atomic for the physics reading it: no lock needed.
        self.actuators.goal_q[k] = (self.direction[k] * (self._goal_ticks(k) - self.zero_ticks[k])
                                    / self.ticks_per_rad)

    def _refresh_present(self, servos: Sequence[int]) -> None:
        """Copy the physics' present values of `servos` into their tables: the newest whole
        physics step, without waiting for the one running (Actuators.read_present)."""
        act = self.actuators
        act.read_present(self._present)
        q, dq, tau = self._present.tolist()
        temperature = act.temperature_c.tolist()
        if any(self._cuts_torque(k) for k in servos):
            with act.lock:
                for k in servos:
                    if self._cuts_torque(k):
                        act.torque_enabled[k] = False
                        self.tables[k][self.addr_torque] = 0
        for k in servos:
            self._put_present(k, q[k], dq[k], tau[k], temperature[k])
