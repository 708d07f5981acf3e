"""Bundle store on a real filesystem with real (tiny) ONNX bundles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from onnx_bundle import JOINTS, make_bundle

from runtime.cli import main
from runtime.deploy.bundle_store import BundleStore
from runtime.model.bundle import BundleError


def _bundle(tmp: Path, version: str) -> Path:
    path = make_bundle(tmp / f"src-{version}")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["version"] = version  # the manifest itself is not in the hashed file list
    # the same version built again must be the same bundle, even a second later
    manifest["provenance"]["created"] = "2026-01-01T00:00:00+00:00"
    (path / "manifest.json").write_text(json.dumps(manifest))
    return path


def test_add_activate_rollback_swaps_symlinks(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles", expect_joints=JOINTS)
    assert store.add(_bundle(tmp_path, "v1")) is True
    assert store.add(_bundle(tmp_path, "v2")) is True
    assert store.add(_bundle(tmp_path / "again", "v1")) is False  # identical: nothing to do
    assert store.activate("v1") is None
    assert store.activate("v2") == "v1"
    current, previous = tmp_path / "bundles/current", tmp_path / "bundles/previous"
    assert os.readlink(current) == "v2" and os.readlink(previous) == "v1"
    assert (current / "manifest.json").is_file()  # relative link resolves
    assert store.rollback() == "v1"
    assert os.readlink(current) == "v1" and os.readlink(previous) == "v2"
    listed = {b.version: (b.current, b.previous) for b in store.list()}
    assert listed == {"v1": (True, False), "v2": (False, True)}
    assert not list((tmp_path / "bundles").glob(".*"))  # no temp links or staging left


def test_tampered_bundle_is_refused_everywhere(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    src = _bundle(tmp_path, "v1")
    (src / "follower.onnx").write_bytes(b"not the model")
    with pytest.raises(BundleError, match=r"follower\.onnx"):
        store.add(src)
    assert not (tmp_path / "bundles" / "v1").exists()
    good = "v2"
    assert store.add(_bundle(tmp_path, good))
    (tmp_path / "bundles" / good / "planner.onnx").write_bytes(b"corrupted on disk")
    with pytest.raises(BundleError, match=r"planner\.onnx"):
        store.activate(good)
    assert not (tmp_path / "bundles" / "current").exists()


def test_wrong_robot_unknown_version_and_no_previous(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles", expect_joints=["a", "b"])
    with pytest.raises(BundleError, match="joints"):
        store.add(_bundle(tmp_path, "v1"))
    with pytest.raises(BundleError, match="no bundle 'v9'"):
        store.activate("v9")
    with pytest.raises(BundleError, match="no previous"):
        store.rollback()


def test_same_version_different_content_is_refused(tmp_path: Path) -> None:
    store = BundleStore(tmp_path / "bundles")
    store.add(_bundle(tmp_path, "v1"))
    other = _bundle(tmp_path / "other", "v1")
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["contract"]["rates"]["planner_hz"] = 7.0
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="different bundle"):
        store.add(other)


def test_bundle_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = ["--store", str(tmp_path / "b"), "--config", str(tmp_path / "none.yaml")]
    assert main(["bundle", "add", str(_bundle(tmp_path, "v1")), *store]) == 0
    assert main(["bundle", "add", str(_bundle(tmp_path, "v2")), *store]) == 0
    assert "added v2; make it current: duet bundle activate v2" in capsys.readouterr().out
    assert main(["bundle", "add", str(_bundle(tmp_path / "again", "v2")), *store]) == 0
    assert "v2 is already installed (identical): nothing to do" in capsys.readouterr().out
    assert main(["bundle", "activate", "v1", *store]) == 0
    assert main(["bundle", "activate", "v2", *store]) == 0
    assert main(["bundle", "rollback", *store]) == 0
    capsys.readouterr()
    assert main(["bundle", "list", *store]) == 0
    out = capsys.readouterr().out
    assert "* v1" in out and "< v2" in out
    assert main(["bundle", "activate", "nope", *store]) == 1
    assert "no bundle 'nope'" in capsys.readouterr().err


def test_add_copies_only_listed_files_and_refuses_symlinks(tmp_path: Path) -> None:
    """A signed bundle with a planted TensorRT engine beside it: the engine never reaches
    the store (engines are built on the robot, into a root-owned cache)."""
    src = _bundle(tmp_path, "v1")
    (src / "engines").mkdir()
    (src / "engines" / "planner.plan").write_bytes(b"planted")
    (src / "notes.txt").write_text("extra")
    store = BundleStore(tmp_path / "bundles")
    assert store.add(src)
    stored = tmp_path / "bundles" / "v1"
    assert not (stored / "engines").exists() and not (stored / "notes.txt").exists()
    assert sorted(p.name for p in stored.iterdir()) == sorted(
        ["manifest.json", *json.loads((src / "manifest.json").read_text())["files"]])
    other = _bundle(tmp_path / "o", "v2")
    (other / "manifest.json").rename(tmp_path / "real-manifest.json")
    (other / "manifest.json").symlink_to(tmp_path / "real-manifest.json")
    with pytest.raises(BundleError, match=r"manifest.json: a symbolic link"):
        store.add(other)
    assert not any(p.name.startswith(".incoming") for p in (tmp_path / "bundles").iterdir())


def test_the_rollback_floor_refuses_an_older_signed_version(tmp_path: Path) -> None:
    """bundle.min_version: activate (and so rollback) refuse a bundle whose manifest version
    is stamped before the floor, whatever its folder is called; newer ones pass."""
    old, new = "20250101-000000-int8-aaaa", "20250301-000000-int8-bbbb"
    store = BundleStore(tmp_path / "bundles", expect_joints=JOINTS)
    assert store.add(_bundle(tmp_path, old)) and store.add(_bundle(tmp_path, new))
    floored = BundleStore(tmp_path / "bundles", expect_joints=JOINTS,
                          min_version="20250201-000000")
    with pytest.raises(BundleError, match=r"older than bundle\.min_version 20250201-000000"):
        floored.activate(old)
    assert floored.activate(new) is None
    store.activate(old)  # without a floor: allowed
    store.activate(new)
    with pytest.raises(BundleError, match="rollback floor"):
        floored.rollback()  # previous is the old one
    assert os.readlink(tmp_path / "bundles/current") == new
    os.rename(tmp_path / "bundles" / old, tmp_path / "bundles/20990101-000000-renamed")
    with pytest.raises(BundleError, match="older than"):  # the signed version counts
        floored.activate("20990101-000000-renamed")
