"""What a motor-bus family is to the rest of duet: one small class per family, listed by name
in drivers/families.py (the python-can way, as drivers/mit_dialects.py does for the CAN
dialects), so that the runtime, the sim, install and doctor never branch on `bus.kind`.

A family answers, from its bus config (duck-typed: the matching section of runtime.config):
how to open the bus, the wire time of one tick (the bus budget), the wire it occupies, the
emulator the sim serves it with, what install writes for it (udev rules, the systemd device)
and what doctor checks. Drivers and emulators are named by "module:attribute" strings,
imported on use: the config and the budget import no serial or CAN stack, and drivers/ never
imports the sim (nor the drivers this table, which keeps the package free of cycles).
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar, NamedTuple

from drivers.bus import MotorBus
from drivers.device_access import Account


class DeviceCheck(NamedTuple):
    """One `duet doctor` verdict on a bus's device: level "ok", "warn" or "fail"."""

    level: str
    detail: str
    fix: str = ""


Rendered = tuple[str, dict[str, str]]  # (template file name, its fields)


def resolve(target: str) -> Any:
    """The object a "package.module:attribute" string names."""
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


class BusFamily:
    """One motor family's bus: class-level answers, no state."""

    name: ClassVar[str]  # the bus config's `kind`
    driver: ClassVar[str]  # "module:Class", a MotorBus with from_config(bus_cfg, joint_names)
    # "module:function" of the sim (resolved by the sim only):
    # function(actuators, bus_cfg, joint_indices, duet_cfg) -> the sim's motor link
    emulator: ClassVar[str]
    sim_transport: ClassVar[str]  # the `sim.transport` that serves this family
    wire_key: ClassVar[str]  # the bus config key that names its wire ("device", "channel")
    # installed rules file (relative to the root) rendered from config values, which
    # `duet config set` re-renders; None when the rules only match the adapter
    config_rules: ClassVar[str | None] = None

    @classmethod
    def open(cls, bus_cfg: Any, joints: list[str]) -> MotorBus:
        """Construct (not yet open) the family's bus driving `joints`."""
        bus: MotorBus = resolve(cls.driver).from_config(bus_cfg, joints)
        return bus

    @classmethod
    def wire(cls, bus_cfg: Any) -> object:
        """What identifies the physical wire: two bus sections on one wire are one bus."""
        return getattr(bus_cfg, cls.wire_key)

    @classmethod
    def tick_wire(cls, bus_cfg: Any, n_motors: int) -> tuple[float, str]:
        """Wire time of one tick (read and write every motor) in us, and its arithmetic."""
        raise NotImplementedError

    @classmethod
    def device_path(cls, bus_cfg: Any) -> str:
        """The path whose systemd .device unit the follower waits for."""
        raise NotImplementedError

    @classmethod
    def device_node(cls, bus_cfg: Any) -> str | None:
        """A device file that must exist before the follower starts (None: nothing to find)."""
        return None

    @classmethod
    def simulated(cls, bus_cfg: Any) -> list[str]:
        """Why this bus is the sim's ("device is `sim`"), as "<key> is ..." phrases."""
        return []

    @classmethod
    def udev_files(cls, bus_cfg: Any, usb_serial: str | None) -> dict[str, Rendered]:
        """What install writes: path relative to the root -> (template file name, its fields).
        `usb_serial` pins the rule to one adapter (None: any adapter of the usual kind)."""
        raise NotImplementedError

    @classmethod
    def usb_serial_in(cls, rules_text: str) -> str | None:
        """The adapter serial an installed `config_rules` file was rendered with."""
        return None

    @classmethod
    def check_device(cls, bus_cfg: Any, installed: bool, sys_root: str = "/sys",
                     who: Account | None = None) -> DeviceCheck:
        """Doctor: can the follower open this bus now (exists, permitted for `who`, the
        account the follower runs as; default: the caller, as on a workstation; up)?"""
        raise NotImplementedError
