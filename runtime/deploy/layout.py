"""Where duet lives on a robot. Every path hangs off `root` so `--root DIR` stages a tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = "/opt/duet"
# The systemd units in systemd/ name this prefix literally; install rewrites it when it differs.
UNIT_PREFIX = DEFAULT_PREFIX


@dataclass(frozen=True)
class Layout:
    root: Path = Path("/")

    def _at(self, path: str) -> Path:
        return self.root / path.lstrip("/")

    @property
    def etc(self) -> Path:
        return self._at("/etc/duet")

    @property
    def config(self) -> Path:
        return self.etc / "duet.yaml"

    @property
    def site(self) -> Path:
        return self.etc / "site.yaml"

    @property
    def state(self) -> Path:
        return self._at("/var/lib/duet")

    @property
    def bundles(self) -> Path:
        return self.state / "bundles"

    @property
    def change_log(self) -> Path:
        return self.state / "config-changes.log"

    @property
    def recordings(self) -> Path:
        return self.state / "recordings"

    @property
    def units(self) -> Path:
        return self._at("/etc/systemd/system")

    @property
    def udev_rules(self) -> Path:
        return self._at("/etc/udev/rules.d")

    @property
    def network(self) -> Path:
        return self._at("/etc/systemd/network")

    @property
    def sysusers(self) -> Path:
        return self._at("/etc/sysusers.d")

    @property
    def tmpfiles(self) -> Path:
        return self._at("/etc/tmpfiles.d")


def repo_systemd_dir() -> Path:
    """The unit files shipped in the source tree (duet install runs from a checkout)."""
    return Path(__file__).resolve().parents[2] / "systemd"


def templates_dir() -> Path:
    return Path(__file__).resolve().parent / "templates"
