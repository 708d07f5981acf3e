"""Two network namespaces joined by a veth pair, made (and always removed) by a test: a
"robot" side and a "server" side with their own addresses, so a link can be taken down
(a partition) without touching this host's own network. Needs root and `ip netns`."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

PREFIX = "duett"  # namespaces named duett<pid><r|s>: a dead pid's leftovers are removed
ROBOT_IP, SERVER_IP = "10.213.77.1", "10.213.77.2"  # inside our own namespaces only


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"{PREFIX}{os.getpid()}p"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`ip netns` unavailable: {exc}"
    return None


def remove_leftovers() -> None:
    """Namespaces of earlier test runs whose process is gone (a killed run)."""
    for path in Path("/run/netns").glob(f"{PREFIX}*"):
        m = re.fullmatch(rf"{PREFIX}(\d+)[rsp]", path.name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            subprocess.run(["ip", "netns", "del", path.name], capture_output=True, timeout=10)


class VethLink:
    def __init__(self) -> None:
        pid = os.getpid()
        self.robot, self.server = f"{PREFIX}{pid}r", f"{PREFIX}{pid}s"
        self.robot_if, self.server_if = f"dtr{pid}"[:15], f"dts{pid}"[:15]

    def __enter__(self) -> VethLink:
        try:
            for ns in (self.robot, self.server):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
            _ip("link", "add", self.robot_if, "netns", self.robot, "type", "veth", "peer",
                "name", self.server_if, "netns", self.server)
            for ns, dev, addr in ((self.robot, self.robot_if, ROBOT_IP),
                                  (self.server, self.server_if, SERVER_IP)):
                _ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
                _ip("-n", ns, "link", "set", dev, "up")
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_up(self, up: bool) -> None:
        """The robot side's end of the link up or down (a partition)."""
        _ip("-n", self.robot, "link", "set", self.robot_if, "up" if up else "down")

    def exec_in(self, ns: str) -> list[str]:
        """The command prefix that runs a process inside namespace `ns`."""
        return ["ip", "netns", "exec", ns]

    def close(self) -> None:
        for ns in (self.robot, self.server):  # the veth pair goes with its namespaces
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)
