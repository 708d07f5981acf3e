"""A bundle folder others can write could be swapped between its verification and the engines
opening its files (issue 21, item 6): the bundle a process runs (`robot_bundle`) is loaded only
from where nobody but root and this user can write. Here a real other user (nobody) tries the
swap right after the check, as an attacker would."""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from onnx_bundle import make_bundle
from stack import REPO

import runtime.model.robot_bundle as rb
from runtime.config import load_config
from runtime.model.bundle import BundleError

NOBODY = pwd.getpwnam("nobody")
pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switches to another uid")

_SWAP = """
import os, sys
os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[3]))
evil = os.path.join(sys.argv[1], ".evil")
try:
    with open(evil, "wb") as f:
        f.write(b"not the verified model")
    os.replace(evil, os.path.join(sys.argv[1], "planner.onnx"))
    print("SWAPPED")
except OSError as exc:
    print("REFUSED", exc.strerror)
"""


@pytest.fixture
def open_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="duet-swap-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _swap_after_the_check(monkeypatch: pytest.MonkeyPatch, folder: Path) -> list[str]:
    """Run nobody's swap the moment load_bundle has verified the folder."""
    said: list[str] = []
    real = rb.load_bundle

    def load_then_swap(*args: Any, **kwargs: Any) -> Any:
        bundle = real(*args, **kwargs)
        out = subprocess.run([sys.executable, "-c", _SWAP, str(folder), str(NOBODY.pw_gid),
                              str(NOBODY.pw_uid)], capture_output=True, text=True, timeout=30)
        said.append(out.stdout.strip())
        return bundle

    monkeypatch.setattr(rb, "load_bundle", load_then_swap)
    return said


def _verified_hash(folder: Path) -> str:
    return str(json.loads((folder / "manifest.json").read_text())["files"]["planner.onnx"])


def test_a_folder_others_can_write_is_refused_before_it_is_read(
        open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_bundle(open_dir / "bundle")
    cfg = load_config(REPO / "configs/sim.yaml", None, [f"bundle.path={folder}"])
    folder.chmod(0o777)  # a shared folder: anyone may replace files in it
    said = _swap_after_the_check(monkeypatch, folder)
    with pytest.raises(BundleError, match="writable by everyone"):
        rb.robot_bundle(cfg)
    assert said == []  # refused before the verification the swap would have followed
    folder.chmod(0o775)
    os.chown(folder, 0, NOBODY.pw_gid)  # a group with another user in it: the same
    with pytest.raises(BundleError, match=f"writable by group {NOBODY.pw_gid}"):
        rb.robot_bundle(cfg)


def test_in_a_folder_only_root_writes_the_swap_fails_and_the_verified_file_runs(
        open_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_bundle(open_dir / "bundle")
    cfg = load_config(REPO / "configs/sim.yaml", None, [f"bundle.path={folder}"])
    said = _swap_after_the_check(monkeypatch, folder)
    bundle = rb.robot_bundle(cfg)
    assert said and said[0].startswith("REFUSED"), said
    opened = hashlib.sha256((bundle.path / "planner.onnx").read_bytes()).hexdigest()
    assert opened == _verified_hash(folder)  # what the engine opens is what was verified


def test_a_bundle_reached_through_a_link_is_judged_by_the_folders_not_the_link(
        open_dir: Path) -> None:
    """A link's own mode is always rwxrwxrwx and means nothing (its folder guards it): a
    checkout linked into a private folder loads; a link into a shared folder is refused."""
    make_bundle(open_dir / "bundle")
    private = open_dir / "private"
    private.mkdir(mode=0o700)
    (private / "bundles").symlink_to(open_dir)
    cfg = load_config(REPO / "configs/sim.yaml", None, [f"bundle.path={private}/bundles/bundle"])
    assert rb.robot_bundle(cfg).path.name == "bundle"
    open_dir.chmod(0o777)  # where the link points: anyone may swap the bundle
    with pytest.raises(BundleError, match=f"{open_dir}: writable by everyone"):
        rb.robot_bundle(cfg)
