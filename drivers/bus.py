"""The one motor-bus interface the follower uses for every bus (Dynamixel, MIT-mode CAN).

Everything is vectorised over the configured motors, in SI units (rad, rad/s, N·m), in the
order of the config's joint list. Implementations preallocate; `read`/`write` do not
allocate on the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class BusError(Exception):
    """The bus could not complete a transaction (timeout, CRC, framing, device gone)."""

    def __init__(self, message: str, motor: str | None = None) -> None:
        super().__init__(message)
        self.motor = motor


class MotorFault(BusError):
    """A motor reported a hardware error (overload, overheating, ...)."""


class CommandError(Exception):
    """The driver refused a command: non-finite or outside the motor's own limits.

    Raised by `MotorBus.write` before anything reaches the wire; `motor` names the joint.
    """

    def __init__(self, message: str, motor: str | None = None) -> None:
        super().__init__(message)
        self.motor = motor


@dataclass
class MotorState:
    """Preallocated state buffers, filled in place by `MotorBus.read`."""

    n: int
    q: np.ndarray = field(init=False)  # rad
    dq: np.ndarray = field(init=False)  # rad/s
    effort: np.ndarray = field(init=False)  # N·m (or the bus's effort unit converted to it)
    error_flags: np.ndarray = field(init=False)  # per-motor hardware error bits, 0 = healthy
    temperature_c: np.ndarray = field(init=False)  # hottest reported temperature, NaN = none
    t_ns: int = 0  # time.monotonic_ns() when the read completed

    def __post_init__(self) -> None:
        self.q = np.zeros(self.n)
        self.dq = np.zeros(self.n)
        self.effort = np.zeros(self.n)
        self.error_flags = np.zeros(self.n, dtype=np.uint32)
        self.temperature_c = np.full(self.n, np.nan)


@dataclass
class BusStats:
    reads: int = 0
    writes: int = 0
    errors: int = 0  # failed transactions after retries
    retries: int = 0
    crc_errors: int = 0
    timeouts: int = 0
    missing_replies: int = 0
    per_motor_errors: dict[str, int] = field(default_factory=dict)
    # frames off the wire that no motor could have sent, dropped before decoding, by reason
    dropped_frames: dict[str, int] = field(default_factory=dict)


class MotorBus(Protocol):
    joint_names: list[str]

    @property
    def stats(self) -> BusStats: ...

    def open(self) -> None: ...

    def enable_torque(self, on: bool) -> None: ...

    def read(self, out: MotorState) -> None:
        """Fill `out` with one synchronous read of every motor; raise BusError on failure."""
        ...

    def write(
        self,
        q_target: np.ndarray,
        kp: np.ndarray | None = None,
        kd: np.ndarray | None = None,
        tau_ff: np.ndarray | None = None,
    ) -> None:
        """One synchronous write of every motor's command (kp/kd/tau_ff only for MIT mode).

        Raises CommandError (nothing sent) for a non-finite value or one outside a motor's
        own limits, BusError when the wire fails.
        """
        ...

    def present_goal(self, out: np.ndarray) -> bool:
        """Fill `out` (rad, joint order) with the position each motor holds right now.

        Returns True when torque is on for every motor. Where torque is off, `out` holds the
        measured position and the result is False; a bus that cannot tell whether torque is
        on returns False (its docstring says what `out` then holds). For start-up and reset
        only, not the tick: commanding `out` next moves nothing.
        """
        ...

    def recover(self, motors: list[str]) -> None:
        """Clear the latched hardware error (overload, overheating, ...) of these motors (joint
        names), so torque can come back; torque is off after. BusError where the wire cannot
        clear it, saying what does (a power cycle). For `duet reboot`, never the tick."""
        ...

    def close(self) -> None: ...

    def wire_time_us(self) -> float:
        """Time one tick (read + write) spends on the wire at the configured rate."""
        ...
