"""Sealing a staged bundle, the last step of every export: its files hashed into the manifest,
signed, checked by the robot's own `load_bundle`, and moved into place in one rename."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

from export.signing import sign_bundle
from runtime.model.bundle import MANIFEST, SIGNATURE, ManifestV2, load_bundle, sha256_file

# files hash -> created -> the manifest to write (its `files` the hashes given)
ManifestFor = Callable[[dict[str, str], datetime], ManifestV2]


def seal(staged: Path, out: Path, manifest_for: ManifestFor, sign_key: Path | None) -> Path:
    """Write `manifest_for(hashes of staged's files, now)` into `staged`, sign it with
    `sign_key` (None: unsigned), check it as a robot loads it, then replace `out` with it.
    `staged` and `out` share a folder (a rename, not a copy: `out` is whole or absent)."""
    files = {str(p.relative_to(staged)): sha256_file(p) for p in sorted(staged.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST, SIGNATURE)}
    manifest = manifest_for(files, datetime.now(timezone.utc))
    (staged / MANIFEST).write_text(manifest.model_dump_json(indent=2) + "\n")
    if sign_key is not None:
        sign_bundle(staged, sign_key)
    load_bundle(staged)  # the robot's own checks, before moving into place
    if out.exists():
        shutil.rmtree(out)
    staged.rename(out)
    return out
