"""What makes a Jetson a Jetson, read from the files and tools JetPack ships: the L4T release
(/etc/nv_tegra_release), the power mode (`nvpmodel -q`) and whether `jetson_clocks` has pinned
the clocks (`jetson_clocks --show`). Every reader takes text or a root folder, so a staged tree
with a copied nv_tegra_release answers like the robot."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

RELEASE_FILE = "etc/nv_tegra_release"
# L4T major release -> JetPack major (NVIDIA's release notes)
JETPACK = {32: "4", 34: "5", 35: "5", 36: "6", 38: "7"}
_RELEASE = re.compile(r"#\s*R(\d+)\s*\(release\),\s*REVISION:\s*([0-9.]+)")


@dataclass(frozen=True)
class L4TRelease:
    major: int | None  # None: the file exists but says no release we can read
    revision: str = ""
    board: str = ""

    @property
    def name(self) -> str:
        return f"R{self.major}.{self.revision}" if self.major is not None else "unknown"

    @property
    def jetpack(self) -> str | None:
        return JETPACK.get(self.major) if self.major is not None else None

    def __str__(self) -> str:
        jp = f" (JetPack {self.jetpack})" if self.jetpack else ""
        return f"L4T {self.name}{jp}" + (f", board {self.board}" if self.board else "")


def l4t_release(root: Path = Path("/")) -> L4TRelease | None:
    """The L4T release of the system at `root`, or None when it is not a Jetson (no
    /etc/nv_tegra_release). Only the first line is read, and at most 4 KiB of it."""
    path = root / RELEASE_FILE
    try:
        with path.open("rb") as f:
            head = f.read(4096).decode(errors="replace")
    except FileNotFoundError:
        return None
    except OSError:
        return L4TRelease(None)
    found = _RELEASE.search(head.splitlines()[0] if head else "")
    if found is None:
        return L4TRelease(None)
    board = re.search(r"BOARD:\s*([\w.-]+)", head)
    return L4TRelease(int(found.group(1)), found.group(2), board.group(1) if board else "")


@dataclass(frozen=True)
class PowerMode:
    name: str
    mode_id: int | None

    @property
    def is_max(self) -> bool:
        """MAXN (or MAXN_SUPER): no power cap. Other modes cap clocks and cores."""
        return self.name.upper().startswith("MAXN")


def parse_nvpmodel(text: str) -> PowerMode | None:
    """`nvpmodel -q`: 'NV Power Mode: MAXN' then the mode id on its own line (warnings such
    as 'NVPM WARN: fan mode is not set!' may come first)."""
    lines = [ln.strip() for ln in text.splitlines()]
    for i, line in enumerate(lines):
        found = re.match(r"NV Power Mode:\s*(\S.*)$", line)
        if found:
            following = lines[i + 1] if i + 1 < len(lines) else ""
            return PowerMode(found.group(1), int(following) if following.isdigit() else None)
    return None


@dataclass(frozen=True)
class ClockState:
    pinned: bool  # every CPU and the GPU at min = max frequency: what jetson_clocks does
    loose: tuple[str, ...]  # the ones that still scale

    def __str__(self) -> str:
        return "pinned at maximum (jetson_clocks on)" if self.pinned else \
            f"scaling ({', '.join(self.loose)}): jetson_clocks off"


_FREQS = re.compile(r"MinFreq=(\d+)\s+MaxFreq=(\d+)")


def parse_jetson_clocks(text: str) -> ClockState | None:
    """`jetson_clocks --show`: lines 'cpuN: Online=1 ... MinFreq=a MaxFreq=b ...' and
    'GPU MinFreq=a MaxFreq=b ...'; jetson_clocks sets min = max for each."""
    loose: list[str] = []
    seen = 0
    for line in text.splitlines():
        unit = re.match(r"\s*(cpu\d+|GPU)\b", line)
        freqs = _FREQS.search(line)
        if unit is None or freqs is None or "Online=0" in line:
            continue
        seen += 1
        if freqs.group(1) != freqs.group(2):
            loose.append(unit.group(1))
    if not seen:
        return None
    return ClockState(not loose, tuple(loose))
