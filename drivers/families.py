"""The motor-bus families by name (the bus config's `kind`), and the bus budget through them.

Adding a family is one entry here plus its family module (drivers/bus_family.py says what a
family answers) and its driver; the config schema grows its bus section. Nothing else in the
runtime, the sim, install or doctor names a family.
"""

from __future__ import annotations

from typing import Any

from drivers.bus_budget import DEFAULT_USABLE_FRACTION, Budget
from drivers.bus_family import BusFamily
from drivers.dynamixel_family import DynamixelFamily
from drivers.feetech_family import FeetechFamily
from drivers.mit_can_family import MitCanFamily

FAMILIES: dict[str, type[BusFamily]] = {
    f.name: f for f in (DynamixelFamily, FeetechFamily, MitCanFamily)}


def family(kind: str) -> type[BusFamily]:
    """The family of a bus `kind`; ValueError naming the known ones."""
    try:
        return FAMILIES[kind]
    except KeyError:
        raise ValueError(f"unknown bus kind {kind!r} (known: {', '.join(FAMILIES)})") from None


def family_of(bus_cfg: Any) -> type[BusFamily]:
    """The family of a bus config section (by its `kind`)."""
    return family(getattr(bus_cfg, "kind", None))  # type: ignore[arg-type]


def tick_budget(
    bus: Any, n_motors: int, follower_hz: float, usable_fraction: float = DEFAULT_USABLE_FRACTION
) -> Budget:
    """Budget for a bus config (duck-typed: `kind` names the family, which reads its rates)."""
    if follower_hz <= 0:
        raise ValueError(f"follower rate must be > 0 Hz, got {follower_hz}")
    if not 0 < usable_fraction <= 1:
        raise ValueError(f"usable fraction must be in (0, 1], got {usable_fraction}")
    wire, arithmetic = family_of(bus).tick_wire(bus, n_motors)
    return Budget(wire, 1e6 / follower_hz, usable_fraction, arithmetic)


def check_budget(
    bus: Any, n_motors: int, follower_hz: float, usable_fraction: float = DEFAULT_USABLE_FRACTION
) -> Budget:
    """Return the tick budget; raise ValueError showing the arithmetic when it does not fit."""
    b = tick_budget(bus, n_motors, follower_hz, usable_fraction)
    if b.wire_us > b.usable_us:
        raise ValueError(
            f"bus cannot carry follower.hz={follower_hz:g}: {b.arithmetic}; the period is"
            f" {b.period_us:.1f} us and {usable_fraction:g} of it is {b.usable_us:.1f} us;"
            f" {b.wire_us:.1f} us > {b.usable_us:.1f} us. Lower follower.hz to at most"
            f" {int(b.max_hz)} Hz, raise the bus rate, or split the motors across buses."
        )
    return b
