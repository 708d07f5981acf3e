"""File changes that can be undone: `duet install` and `duet config set` write through a
Journal, and on a failure restore every path to what it was before (content, link or absence),
so a failed step never leaves a half-installed robot.

Writes are atomic (temp file in the same folder, fsync, rename); a replaced file keeps its
previous content as PATH.bak, itself swapped in atomically, so a kill at any instant leaves
either the old or the new file and a complete backup. What such a kill can leave is a temp
file, named `.NAME.XXXXXXXX.duet-tmp` so that the next writer holding the folder's lock
(`duet config set`) knows it for its own and removes it (`remove_stale_temps`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


TEMP_SUFFIX = ".duet-tmp"


def remove_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files a killed writer left in `folder`. Only under the folder's lock:
    a live writer's temp file looks the same."""
    stale = [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file() and not p.is_symlink()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _replace_with(path: Path, data: bytes, mode: int) -> None:
    """Write `data` beside `path` under a hidden temp name, fsync, rename over `path`."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write(path: Path, text: str, backup: bool = True) -> None:
    """Replace `path` with `text` atomically; with `backup`, the old content becomes PATH.bak
    (also atomically: never an empty or partial backup)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = 0o644
    if path.exists():
        mode = path.stat().st_mode & 0o7777
        if backup:
            _replace_with(path.with_name(path.name + ".bak"), path.read_bytes(), mode)
    _replace_with(path, text.encode(), mode)
    _fsync_dir(path.parent)


@dataclass
class _Before:
    data: bytes | None = None  # a file's content
    mode: int = 0o644
    link: str | None = None  # a symlink's target
    folder: bool = False  # a directory (restored by removing what was added inside it)


def _snapshot(path: Path) -> _Before | None:
    if path.is_symlink():
        return _Before(link=os.readlink(path))
    if path.is_dir():
        return _Before(folder=True)
    if path.is_file():
        return _Before(data=path.read_bytes(), mode=path.stat().st_mode & 0o7777)
    return None


@dataclass
class Journal:
    """Remembers the first state of every path it touches; `rollback` restores them all."""

    before: dict[Path, _Before | None] = field(default_factory=dict)
    made_dirs: list[Path] = field(default_factory=list)

    def touch(self, path: Path) -> None:
        """Remember `path` as it is now (once), and any folders about to be created for it."""
        if path not in self.before:
            self.before[path] = _snapshot(path)
        missing = []
        parent = path.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        self.made_dirs += [d for d in reversed(missing) if d not in self.made_dirs]

    def write(self, path: Path, text: str) -> bool:
        """Write `path` (keeping a .bak of a different old content); False when unchanged."""
        if path.is_file() and not path.is_symlink() and path.read_text() == text:
            return False
        changed = path.exists()
        self.touch(path)
        if changed:
            self.touch(path.with_name(path.name + ".bak"))
        atomic_write(path, text, backup=changed)
        return True

    def symlink(self, path: Path, target: str) -> None:
        if path.is_symlink() and os.readlink(path) == target:
            return
        self.touch(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, path)

    def mkdir(self, path: Path) -> None:
        self.touch(path)
        path.mkdir(parents=True, exist_ok=True)

    def remove(self, path: Path) -> bool:
        """Remove a file, link or folder tree (a folder is not restored on rollback: callers
        remove folders only after every step that can fail)."""
        if not (path.exists() or path.is_symlink()):
            return False
        self.touch(path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True

    def rollback(self) -> list[str]:
        """Restore every touched path; returns what was done, one line per path."""
        done = []
        for path, was in reversed(list(self.before.items())):
            with contextlib.suppress(OSError):
                if was is not None and was.folder:
                    continue  # folders that existed stay; files in them are restored
                if path.is_symlink() or path.is_file():
                    path.unlink()
                elif path.is_dir():
                    shutil.rmtree(path)
                if was is None:
                    done.append(f"removed {path}")
                elif was.link is not None:
                    os.symlink(was.link, path)
                    done.append(f"restored link {path}")
                elif was.data is not None:
                    _replace_with(path, was.data, was.mode)
                    done.append(f"restored {path}")
        for folder in reversed(self.made_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: never what someone else put there
        return done
