"""What the serial-servo families (drivers/dynamixel_family.py, drivers/feetech_family.py)
answer alike: a tty named by `device` ("sim": the sim's pty), a tick whose wire time is its
packets' bytes at the baud rate plus each servo's return delay, and doctor's checks of a serial
device (exists, a character device, read/write for the follower's user, the FTDI latency)."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any, ClassVar

from drivers.bus_budget import UART_BITS_PER_BYTE, SerialPackets
from drivers.bus_family import BusFamily, DeviceCheck
from drivers.device_access import Account, group_name, owner_text


class SerialFamily(BusFamily):
    sim_transport = "serial"
    wire_key = "device"
    packets: ClassVar[SerialPackets]  # the protocol's tick on the wire

    @classmethod
    def tick_wire(cls, bus_cfg: Any, n_motors: int) -> tuple[float, str]:
        delay = float(getattr(bus_cfg, "return_delay_us", 0.0) or 0.0)
        n_bytes = cls.packets.tick_bytes(n_motors)
        wire = cls.packets.tick_us(bus_cfg.baudrate, n_motors, return_delay_us=delay)
        return wire, (
            f"{cls.name} at {bus_cfg.baudrate} baud: {n_motors} motors, sync read + status +"
            f" sync write = {n_bytes} bytes x {UART_BITS_PER_BYTE} bits"
            f" + {n_motors} x {delay:g} us return delay = {wire:.1f} us per tick")

    @classmethod
    def device_path(cls, bus_cfg: Any) -> str:
        return str(bus_cfg.device)

    @classmethod
    def device_node(cls, bus_cfg: Any) -> str | None:
        return None if bus_cfg.device == "sim" else str(bus_cfg.device)

    @classmethod
    def simulated(cls, bus_cfg: Any) -> list[str]:
        return ["device is `sim`"] if bus_cfg.device == "sim" else []

    @classmethod
    def check_device(cls, bus_cfg: Any, installed: bool, sys_root: str = "/sys",
                     who: Account | None = None) -> DeviceCheck:
        device = bus_cfg.device
        if device == "sim":
            if installed:
                return DeviceCheck("fail", "bus.device is `sim` in the installed config: "
                                   "the follower has no motors and will crash-loop",
                                   "sudo duet config set bus.device=/dev/ttyDUET0")
            return DeviceCheck("ok", "sim pty (created by the sim at start)")
        path = Path(device)
        if not path.exists():
            return DeviceCheck("fail", f"{device} does not exist",
                               "plug in the adapter; check `udevadm info -a -n /dev/ttyUSB0` "
                               "against /etc/udev/rules.d/99-duet-serial.rules (re-run duet "
                               "install --usb-serial)")
        if not stat.S_ISCHR(path.stat().st_mode):
            return DeviceCheck("fail", f"{device} is not a character device")
        who = who or Account.caller()
        if not who.can_read_write(path):
            st = path.stat()
            group = group_name(st.st_gid)
            return DeviceCheck("fail", f"{device} ({owner_text(st)}) is not read/writable by "
                               f"{who.name}",
                               f"the follower's user must be in group {group}: "
                               f"SupplementaryGroups={group} in its unit, or usermod -aG "
                               f"{group} USER")
        # a WCH chip (Feetech's adapters) has no latency timer: this finds nothing there
        real = os.path.realpath(device)
        latency = Path(sys_root) / "bus/usb-serial/devices" / Path(real).name / "latency_timer"
        if latency.exists() and latency.read_text().strip() not in ("0", "1"):
            return DeviceCheck("warn", f"{device} ok but FTDI latency_timer is "
                               f"{latency.read_text().strip()} ms",
                               f"echo 1 | sudo tee {latency} (the duet udev rule sets it on "
                               "plug-in)")
        return DeviceCheck("ok", f"{device} -> {real}, read/write for {who.name}")
