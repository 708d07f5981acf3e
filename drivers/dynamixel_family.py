"""The Dynamixel Protocol 2.0 family: servos on a half-duplex serial line (drivers/dynamixel.py)."""

from __future__ import annotations

from typing import Any

from drivers.bus_budget import DYNAMIXEL_PACKETS
from drivers.bus_family import Rendered
from drivers.serial_family import SerialFamily

# USB ids of the ROBOTIS U2D2 (FTDI FT232H), the usual Dynamixel adapter.
U2D2_MATCH = 'ATTRS{idVendor}=="0403", ATTRS{idProduct}=="6014"'


class DynamixelFamily(SerialFamily):
    name = "dynamixel"
    driver = "drivers.dynamixel:DynamixelBus"
    emulator = "sim.faults:serve_serial"
    packets = DYNAMIXEL_PACKETS

    @classmethod
    def udev_files(cls, bus_cfg: Any, usb_serial: str | None) -> dict[str, Rendered]:
        # the rule names the adapter /dev/ttyDUET0, group dialout (the duet user's, sysusers)
        match = f'ATTRS{{serial}}=="{usb_serial}"' if usb_serial else U2D2_MATCH
        return {"etc/udev/rules.d/99-duet-serial.rules": ("99-duet-serial.rules",
                                                          {"match": match})}
