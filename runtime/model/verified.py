"""Hash a bundle's files once per boot, not at every start.

Hashing a real planner's bundle (GBs of weights) at every start costs seconds to a minute. When
root has hashed every file a manifest lists and found them equal, it leaves a stamp in a tmpfs
(`/run/duet-verified`, gone at reboot) naming the manifest (sha256 of its canonical bytes) and,
per file, what the kernel says of it: device, inode, size, mtime and ctime in ns. A later load,
by any user, skips the hashing only when the stamp is a regular file owned by root, in a
root-owned folder nobody else can write, names this very manifest and bundle folder, and every
file still has the identity recorded; anything else (no stamp, another owner, one changed
field) hashes everything again. What the signature covers (the manifest) is checked at every
load regardless.

What it trusts (docs/bundles.md): root and the kernel. Any write to a file changes its ctime,
which no unprivileged call can set back; replacing a file changes its inode. A file modified
within the kernel's coarse timestamp tick of the hashing could keep its times, so a file
changed less than `SETTLED_S` before the hashing is never stamped (the next start rehashes).
An offline edit (the SD card in another machine) is caught because /run is empty at boot.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import time
from pathlib import Path

STAMP_DIR_ENV = "DUET_VERIFIED_DIR"  # tests point it at their own folder
DEFAULT_STAMP_DIR = "/run/duet-verified"
SETTLED_S = 2.0  # files changed more recently than this are hashed but not stamped
MAX_STAMP_BYTES = 1 << 20

Identity = list[int]  # dev, inode, size, mtime_ns, ctime_ns


def identity(st: os.stat_result) -> Identity:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def hash_file(path: Path) -> tuple[str, Identity | None]:
    """sha256 of the file (streamed, 1 MiB at a time) and its identity, None when it changed
    while it was read or too recently to stamp."""
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        before = os.fstat(fd)
        with os.fdopen(os.dup(fd), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    settled = time.time_ns() - after.st_ctime_ns > SETTLED_S * 1e9
    same = identity(before) == identity(after)
    return h.hexdigest(), identity(after) if same and settled else None


def _folder() -> Path:
    return Path(os.environ.get(STAMP_DIR_ENV, DEFAULT_STAMP_DIR))


def _root_only(st: os.stat_result) -> bool:
    return st.st_uid == 0 and not st.st_mode & 0o022


class Stamp:
    """The stamp of one bundle folder under one manifest."""

    def __init__(self, bundle_dir: Path, manifest_sha256: str) -> None:
        self.bundle_dir = bundle_dir
        self.manifest = manifest_sha256
        key = hashlib.sha256(f"{bundle_dir.resolve()}\0{manifest_sha256}".encode()).hexdigest()
        self.path = _folder() / f"{key[:40]}.json"

    def trusted(self, files: list[str]) -> bool:
        """Every listed file is as root found it when their hashes matched."""
        try:
            st, folder = os.lstat(self.path), os.stat(self.path.parent)
            if not (stat.S_ISREG(st.st_mode) and _root_only(st) and _root_only(folder)) \
                    or st.st_size > MAX_STAMP_BYTES:
                return False
            data = json.loads(self.path.read_bytes())
            recorded = data["files"]
            if data["manifest"] != self.manifest or \
                    data["bundle"] != str(self.bundle_dir.resolve()) or \
                    sorted(recorded) != sorted(files):
                return False
            return all(identity(os.lstat(self.bundle_dir / n)) == recorded[n] for n in files)
        except (OSError, ValueError, KeyError, TypeError):
            return False

    def record(self, identities: dict[str, Identity | None]) -> None:
        """Leave the stamp (root only: nobody else's is trusted), atomically; quietly
        nothing when a file was not settled or /run cannot take it."""
        if os.geteuid() != 0 or any(v is None for v in identities.values()):
            return
        data = {"manifest": self.manifest, "bundle": str(self.bundle_dir.resolve()),
                "files": identities}
        try:
            self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            if not _root_only(os.stat(self.path.parent)):
                return
            tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data))
            os.chmod(tmp, 0o644)
            tmp.replace(self.path)
        except OSError:
            pass  # a read-only or full /run: the next start hashes again
