"""Bundles on the robot: /var/lib/duet/bundles/<version>/, `current` and `previous` symlinks.

Every switch is an atomic rename of a fresh symlink over `current`, so a reader (a service
starting up) sees the old bundle or the new one, never a half-state. A bundle is verified
(hashes, signature when a key is configured, joint names) before it is added or activated.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from runtime.model.bundle import MANIFEST, SIGNATURE, Bundle, BundleError, load_bundle

CURRENT = "current"
PREVIOUS = "previous"
_STAMP = re.compile(r"^(\d{8}-\d{6})")  # YYYYMMDD-HHMMSS, as `duet bundle create` names one


def below_floor(version: str, min_version: str) -> str | None:
    """Why `version` may not be activated under the floor `min_version` (None: it may)."""
    have, floor = _STAMP.match(version), _STAMP.match(min_version)
    if floor is None:
        return f"bundle.min_version {min_version!r} does not start with YYYYMMDD-HHMMSS"
    if have is None:
        return (f"version {version!r} has no YYYYMMDD-HHMMSS stamp to compare with "
                f"bundle.min_version {min_version}")
    if have.group(1) < floor.group(1):
        return f"version {version} is older than bundle.min_version {min_version}"
    return None


@dataclass(frozen=True)
class StoredBundle:
    version: str
    path: Path
    current: bool
    previous: bool
    created: str


class BundleStore:
    def __init__(self, root: Path, public_key: str | None = None,
                 expect_joints: list[str] | None = None, min_version: str | None = None
                 ) -> None:
        self.root = root
        self.public_key = public_key
        self.expect_joints = expect_joints
        self.min_version = min_version  # the rollback floor (bundle.min_version)

    def verify(self, path: Path) -> Bundle:
        return load_bundle(path, self.public_key, self.expect_joints)

    def _link_target(self, name: str) -> str | None:
        link = self.root / name
        return os.readlink(link) if link.is_symlink() else None

    def list(self) -> list[StoredBundle]:
        if not self.root.is_dir():
            return []
        current, previous = self._link_target(CURRENT), self._link_target(PREVIOUS)
        out = []
        for entry in sorted(self.root.iterdir()):
            if entry.is_symlink() or not (entry / MANIFEST).is_file():
                continue
            try:
                created = str(json.loads((entry / MANIFEST).read_text())
                              .get("provenance", {}).get("created", ""))
            except (OSError, ValueError, AttributeError):
                created = "?"
            out.append(StoredBundle(entry.name, entry, entry.name == current,
                                    entry.name == previous, created))
        return out

    @staticmethod
    def _folder_name(version: object, manifest: Path) -> str:
        if not isinstance(version, str) or not version or "/" in version or \
                version in (CURRENT, PREVIOUS, ".", ".."):
            raise BundleError(f"{manifest}: version {version!r} cannot name a folder")
        return version

    def manifest_version(self, source: Path) -> str:
        """The version `source` says it is (read, not verified: `add` verifies)."""
        try:
            version = json.loads((source / MANIFEST).read_text()).get("version")
        except (OSError, ValueError, AttributeError) as exc:
            raise BundleError(f"{source / MANIFEST}: unreadable ({exc})") from None
        return self._folder_name(version, source / MANIFEST)

    def add(self, source: Path) -> bool:
        """Verify `source` and copy it in under its manifest version. False when that
        version is already stored with the same content (nothing to do)."""
        bundle = self.verify(source)
        version = self._folder_name(bundle.manifest.version, source / MANIFEST)
        dest = self.root / version
        if dest.exists():
            # same version string must mean the same content
            self.verify(dest)
            if (dest / MANIFEST).read_bytes() != (source / MANIFEST).read_bytes():
                raise BundleError(f"{dest}: already holds a different bundle named {version!r}")
            return False
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f".incoming-{version}"
        shutil.rmtree(staging, ignore_errors=True)
        try:
            # Only what the manifest lists (and the manifest and its signature): a file
            # planted beside a signed bundle (an `engines/` folder, say) never comes in.
            names = [MANIFEST, *([SIGNATURE] if (source / SIGNATURE).exists() else []),
                     *bundle.files]
            for name in names:
                src = source / name
                if src.is_symlink():  # load_bundle refuses listed symlinks; the manifest too
                    raise BundleError(f"{src}: a symbolic link; a bundle holds plain files")
                (staging / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, staging / name)
            self.verify(staging)  # the copy, not just the source
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        os.rename(staging, dest)
        return True

    def _swap(self, name: str, target: str) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)  # relative target: the tree can be staged with --root
        os.replace(tmp, self.root / name)

    def activate(self, version: str) -> str | None:
        """Point `current` at `version` (verified first, and not below the rollback floor);
        returns the version it replaced."""
        path = self.root / version
        if version in (CURRENT, PREVIOUS) or not (path / MANIFEST).is_file():
            known = ", ".join(b.version for b in self.list()) or "none"
            raise BundleError(f"no bundle {version!r} in {self.root} (installed: {known})")
        bundle = self.verify(path)
        if self.min_version is not None:
            # the signed version, not the folder's name (a folder can be renamed)
            why = below_floor(bundle.manifest.version, self.min_version)
            if why is not None:
                raise BundleError(f"{path}: refused: {why} (the rollback floor)")
        old = self._link_target(CURRENT)
        if old == version:
            return old
        if old is not None:
            self._swap(PREVIOUS, old)
        self._swap(CURRENT, version)
        return old

    def rollback(self) -> str:
        """Swap `current` and `previous`; returns the version now current."""
        previous = self._link_target(PREVIOUS)
        if previous is None:
            raise BundleError(f"{self.root}: no previous bundle to roll back to")
        self.activate(previous)
        return previous

    def current_version(self) -> str | None:
        return self._link_target(CURRENT)

    def current_path(self) -> Path:
        return self.root / CURRENT
