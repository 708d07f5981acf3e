"""The Feetech STS/SCS family: serial-bus servos on a half-duplex TTL line (drivers/feetech.py).

The adapters the SO-100/SO-101 arms ship with are WCH chips: the CH340 (1a86:7523, the
ch341 driver, /dev/ttyUSB*), the CH343 (1a86:55d3) and the CH9102 (1a86:55d4), both
USB CDC-ACM (/dev/ttyACM*, or /dev/ttyCH343USB* under WCH's own driver). udev gives whichever
is plugged in the stable name /dev/ttyDUET0.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from drivers.bus_budget import FEETECH_PACKETS
from drivers.bus_family import DeviceCheck, Rendered
from drivers.device_access import Account
from drivers.serial_family import SerialFamily

# USB ids of the WCH adapters (vendor 1a86): CH340, CH343, CH9102.
WCH_PRODUCTS = {"CH340": "7523", "CH343": "55d3", "CH9102": "55d4"}
RULES_FILE = "etc/udev/rules.d/99-duet-serial.rules"  # one serial bus: one rules file
# ModemManager probes every new ttyACM with AT commands: garbage on the servo line
_LINK = ('SUBSYSTEM=="tty", {match}, SYMLINK+="ttyDUET0", GROUP="dialout", MODE="0660",'
         ' ENV{{ID_MM_DEVICE_IGNORE}}="1"')
# Ubuntu's braille daemon claims the CH340's ids (a braille display uses the same chip): the
# adapter attaches, then its ttyUSB vanishes
BRLTTY_RULES = "usr/lib/udev/rules.d/85-brltty.rules"


class FeetechFamily(SerialFamily):
    name = "feetech"
    driver = "drivers.feetech:FeetechBus"
    emulator = "sim.faults:serve_feetech"
    packets = FEETECH_PACKETS

    @classmethod
    def udev_files(cls, bus_cfg: Any, usb_serial: str | None) -> dict[str, Rendered]:
        if usb_serial:
            rules = [_LINK.format(match=f'ATTRS{{serial}}=="{usb_serial}"')]
        else:
            rules = [_LINK.format(match=f'ATTRS{{idVendor}}=="1a86", ATTRS{{idProduct}}=="{p}"')
                     for p in WCH_PRODUCTS.values()]
        return {RULES_FILE: ("99-duet-feetech.rules", {"rules": "\n".join(rules)})}

    @classmethod
    def check_device(cls, bus_cfg: Any, installed: bool, sys_root: str = "/sys",
                     who: Account | None = None) -> DeviceCheck:
        # a missing CH340 is most often brltty's doing
        check = super().check_device(bus_cfg, installed, sys_root, who)
        brltty = Path(sys_root).parent / BRLTTY_RULES
        if check.level == "fail" and "does not exist" in check.detail and brltty.exists() \
                and WCH_PRODUCTS["CH340"] in brltty.read_text(errors="replace"):
            return DeviceCheck("fail", f"{check.detail}; brltty's udev rules claim CH340"
                               " adapters (1a86:7523) and detach their tty",
                               "sudo apt remove brltty (or mask brltty-udev.service), then"
                               " replug the adapter")
        return check
