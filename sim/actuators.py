"""Shared actuator state between the physics loop and the device emulators.

The physics loop reads the commanded fields and writes the present fields every physics
step; an emulator (Dynamixel over a pty, MIT-mode motors over CAN) reads the present fields
and writes the commanded ones when packets arrive. One lock guards both sides.

A reply must not wait for the physics, as a real servo's does not: the present q, dq and tau
are also published double-buffered (`publish_present`, one writer: the physics), and an
emulator copies the newest complete step from there without the lock (`read_present`, a
seqlock: the writer fills the slot nobody reads, then flips the sequence number).
"""

from __future__ import annotations

import ctypes
import multiprocessing as mp
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Actuator modes, per joint.
MODE_POSITION = 3  # Dynamixel "Position Control" operating mode: on-board PD to goal position
MODE_MIT = 100  # MIT impedance: tau = kp (p - q) + kd (v - dq) + tau_ff

# Hardware error bits (Dynamixel X-series "Hardware Error Status", address 70).
HW_INPUT_VOLTAGE = 1 << 0
HW_OVERHEATING = 1 << 2
HW_ENCODER = 1 << 3
HW_ELECTRICAL_SHOCK = 1 << 4
HW_OVERLOAD = 1 << 5


_ARRAYS = ("torque_enabled", "mode", "goal_q", "goal_dq", "kp", "kd", "tau_ff", "q", "dq", "tau",
           "hw_error", "temperature_c", "silent", "present", "present_seq")


@dataclass
class Actuators:
    n: int
    # threading.Lock, or a multiprocessing lock for `shared` actuators
    lock: Any = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        n = self.n
        # commanded (written by emulators)
        self.torque_enabled = np.zeros(n, dtype=bool)
        self.mode = np.full(n, MODE_POSITION, dtype=np.int32)
        self.goal_q = np.zeros(n)  # rad
        self.goal_dq = np.zeros(n)  # rad/s (MIT)
        self.kp = np.zeros(n)  # N·m/rad (MIT) — position mode uses the servo's own gains
        self.kd = np.zeros(n)  # N·m·s/rad (MIT)
        self.tau_ff = np.zeros(n)  # N·m (MIT)
        # present (written by physics)
        self.q = np.zeros(n)
        self.dq = np.zeros(n)
        self.tau = np.zeros(n)
        self.hw_error = np.zeros(n, dtype=np.uint8)
        self.temperature_c = np.full(n, 30.0)
        # fault injection for tests: a silent motor answers nothing
        self.silent = np.zeros(n, dtype=bool)
        # the present (q, dq, tau) double-buffered for lock-free replies: slot seq & 1 is whole
        self.present = np.zeros((2, 3, n))
        self.present_seq = np.zeros(1, dtype=np.uint64)

    def publish_present(self, q: np.ndarray, dq: np.ndarray, tau: np.ndarray) -> None:
        """The physics' newest step, for `read_present` (one writer only)."""
        seq = int(self.present_seq[0]) + 1
        slot = self.present[seq & 1]  # the slot no reader is copying
        slot[0], slot[1], slot[2] = q, dq, tau
        self.present_seq[0] = seq

    def read_present(self, out: np.ndarray) -> None:
        """Copy the newest whole step's (q, dq, tau) into `out` [3, n], without the lock:
        a copy the writer overlapped (it moved on twice meanwhile) is taken again. With no
        physics publishing (an emulator on its own, its arrays set by a test), those arrays."""
        if not self.present_seq[0]:
            with self.lock:
                out[0], out[1], out[2] = self.q, self.dq, self.tau
            return
        while True:
            seq = int(self.present_seq[0])
            out[:] = self.present[seq & 1]
            if int(self.present_seq[0]) == seq:
                return

    @classmethod
    def shared(cls, n: int) -> Actuators:
        """Arrays in shared memory and a process-shared lock, so an emulator can serve the
        motors from a forked child process with its own interpreter lock."""
        ctx = mp.get_context("fork")
        act = cls(n, lock=ctx.Lock())
        for name in _ARRAYS:
            local = getattr(act, name)
            raw = ctx.RawArray(ctypes.c_uint8, local.nbytes)
            view = np.frombuffer(memoryview(raw), dtype=local.dtype,
                                 count=local.size).reshape(local.shape)
            view[:] = local
            setattr(act, name, view)
        return act
