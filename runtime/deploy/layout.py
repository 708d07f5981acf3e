"""Where duet lives on a robot. Every path hangs off `root` so `--root DIR` stages a tree."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEFAULT_PREFIX = "/opt/duet"
# The systemd units in systemd/ name this prefix literally; install rewrites it when it differs.
UNIT_PREFIX = DEFAULT_PREFIX
# The follower's own state (the latch) on a robot: its unit's StateDirectory=duet/state.
STATE_DIR = "/var/lib/duet/state"


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


def find_source() -> Path | None:
    """The duet source tree `duet install` installs from (units, README, the package): the
    tree this code runs from (a checkout or an editable install), else the working directory
    when it is one (a non-editable bootstrap run inside the checkout)."""
    for tree in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (tree / "systemd" / "duet-follower.service").is_file() and \
                (tree / "pyproject.toml").is_file():
            return tree
    return None


def templates_dir() -> Path:
    return Path(__file__).resolve().parent / "templates"


def installed_root(site: Path) -> Path | None:
    """The root of the install a site file belongs to (ROOT/etc/duet/site.yaml), or None
    for a site file elsewhere (a workstation)."""
    folder = Path(site).absolute().parent
    if folder.name == "duet" and folder.parent.name == "etc":
        return folder.parent.parent
    return None


def store_root(store: Path) -> Path | None:
    """The root of the install a bundle store belongs to (ROOT/var/lib/duet/bundles), or
    None for a store elsewhere (a workstation's)."""
    folder = Path(store).absolute()
    if folder.parts[-4:] == ("var", "lib", "duet", "bundles"):
        return folder.parents[3]
    return None


def change_log(site: Path) -> Path:
    """Where `duet config set` logs changes to `site`: /var/lib/duet/config-changes.log of
    its install, else config-changes.log beside the site file."""
    root = installed_root(site)
    return Layout(root).change_log if root is not None else site.with_name("config-changes.log")
