"""The MIT-mode CAN family: motors on a CAN (FD) bus in one of the dialects of
drivers/mit_dialects.py (drivers/can_mit.py)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from drivers.bus_budget import can_fd_frame_bits, can_frame_bits, can_mit_tick_us
from drivers.bus_family import BusFamily, DeviceCheck, Rendered
from drivers.device_access import Account
from drivers.mit_dialects import dialect_class

SIM_CAN_INTERFACES = ("virtual", "duet-udp")  # python-can interfaces with no motors behind
NETWORK_LINK = "etc/systemd/network/80-duet-can.link"
_SERIAL_MATCH = "Property=ID_SERIAL_SHORT="


class MitCanFamily(BusFamily):
    name = "mit_can"
    driver = "drivers.can_mit:MitCanBus"
    emulator = "sim.faults:serve_can"
    sim_transport = "can"
    wire_key = "channel"
    config_rules = NETWORK_LINK  # names the channel: re-rendered when it changes

    @classmethod
    def wire(cls, bus_cfg: Any) -> object:
        return (bus_cfg.interface, bus_cfg.channel)

    @classmethod
    def tick_wire(cls, bus_cfg: Any, n_motors: int) -> tuple[float, str]:
        reply_dlc = dialect_class(getattr(bus_cfg, "dialect", "generic")).reply_dlc
        rate = bus_cfg.bitrate
        if getattr(bus_cfg, "fd", False):
            data_rate = bus_cfg.data_bitrate
            (cn, cd), (rn, rd) = can_fd_frame_bits(8), can_fd_frame_bits(reply_dlc)
            wire = can_mit_tick_us(rate, n_motors, 8, reply_dlc, True, data_rate)
            return wire, (
                f"mit_can FD at {rate}/{data_rate} bit/s: {n_motors} motors x (command {cn} +"
                f" reply {rn} bits at {rate} bit/s + command {cd} + reply {rd} bits at"
                f" {data_rate} bit/s, 8 + {reply_dlc} data bytes, worst-case stuffing)"
                f" = {wire:.1f} us per tick")
        cmd, rep = can_frame_bits(8), can_frame_bits(reply_dlc)
        wire = can_mit_tick_us(rate, n_motors, 8, reply_dlc)
        return wire, (
            f"mit_can at {rate} bit/s: {n_motors} motors x ({cmd} command + {rep} reply"
            f" bits, worst-case stuffing) = {n_motors * (cmd + rep)} bits = {wire:.1f} us"
            " per tick")

    @classmethod
    def device_path(cls, bus_cfg: Any) -> str:
        return f"/sys/subsystem/net/devices/{bus_cfg.channel}"

    @classmethod
    def simulated(cls, bus_cfg: Any) -> list[str]:
        iface = bus_cfg.interface
        return [f"interface is {iface!r}"] if iface in SIM_CAN_INTERFACES else []

    @classmethod
    def udev_files(cls, bus_cfg: Any, usb_serial: str | None) -> dict[str, Rendered]:
        # systemd-networkd names the adapter's interface; udev brings it up at the bitrate
        match = f"{_SERIAL_MATCH}{usb_serial}" if usb_serial \
            else "Driver=gs_usb"  # candleLight / CANable firmware
        ip = shutil.which("ip") or "/usr/sbin/ip"
        return {
            NETWORK_LINK: ("80-duet-can.link", {"match": match, "channel": bus_cfg.channel}),
            "etc/udev/rules.d/99-duet-can.rules": (
                "99-duet-can.rules",
                {"channel": bus_cfg.channel, "bitrate": str(bus_cfg.bitrate), "ip": ip}),
        }

    @classmethod
    def usb_serial_in(cls, rules_text: str) -> str | None:
        match = rules_text.split("[Match]\n", 1)[-1].split("\n", 1)[0]
        return match.removeprefix(_SERIAL_MATCH) if "=ID_SERIAL" in match else None

    @classmethod
    def check_device(cls, bus_cfg: Any, installed: bool, sys_root: str = "/sys",
                     who: Account | None = None) -> DeviceCheck:
        channel = bus_cfg.channel
        if bus_cfg.interface != "socketcan":
            return DeviceCheck("ok", f"python-can interface {bus_cfg.interface!r} ({channel})")
        base = Path(sys_root) / "class" / "net" / channel
        if not base.exists():
            return DeviceCheck("fail", f"CAN interface {channel} does not exist",
                               "plug in the adapter; check /etc/systemd/network/80-duet-can.link")
        flags = int((base / "flags").read_text(), 16)
        if not flags & 0x1:  # IFF_UP
            return DeviceCheck("fail", f"CAN interface {channel} is down",
                               f"sudo ip link set {channel} up type can bitrate {bus_cfg.bitrate}")
        return DeviceCheck("ok", f"CAN interface {channel} is up")
