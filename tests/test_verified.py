"""Verify once per boot (runtime/model/verified.py): a bundle hashed by root is not hashed
again at the next start while every file keeps the identity root stamped; any change to a
file, the manifest or the stamp itself means hashing again (and refusing a changed file)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from onnx_bundle import make_bundle

from runtime.model import bundle as bundle_mod
from runtime.model import verified
from runtime.model.bundle import BundleError, load_bundle

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="only root leaves stamps")


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[], int]:
    """Files settle at once (they were just written); returns how many files were hashed."""
    monkeypatch.setattr(verified, "SETTLED_S", 0.0)
    monkeypatch.setenv(verified.STAMP_DIR_ENV, str(tmp_path / "run"))
    calls = []

    def counting(path: Path) -> tuple[str, verified.Identity | None]:
        calls.append(path)
        return verified.hash_file(path)

    monkeypatch.setattr(bundle_mod, "hash_file", counting)
    return lambda: len(calls)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("v") / "b")


@pytest.fixture
def bundle(built: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(built, tmp_path / "b"))


def test_a_second_load_trusts_roots_stamp(bundle: Path, hashed: Callable[[], int]) -> None:
    load_bundle(bundle)
    first = hashed()
    assert first == len(json.loads((bundle / "manifest.json").read_text())["files"])
    load_bundle(bundle)
    assert hashed() == first  # nothing hashed again


def test_a_grown_data_file_is_rehashed_and_refused(bundle: Path,
                                                  hashed: Callable[[], int]) -> None:
    load_bundle(bundle)
    with (bundle / "planner.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle)


def test_a_replaced_file_is_rehashed_and_refused(bundle: Path,
                                                 hashed: Callable[[], int]) -> None:
    load_bundle(bundle)
    data = bytearray((bundle / "planner.onnx").read_bytes())
    data[-1] ^= 1
    (bundle / "new").write_bytes(data)
    os.replace(bundle / "new", bundle / "planner.onnx")  # same size, new inode
    with pytest.raises(BundleError, match="does not match"):
        load_bundle(bundle)


def test_a_stamp_root_does_not_own_is_ignored(bundle: Path, hashed: Callable[[], int]) -> None:
    load_bundle(bundle)
    first = hashed()
    stamps = list(Path(os.environ[verified.STAMP_DIR_ENV]).iterdir())
    assert len(stamps) == 1
    os.chown(stamps[0], 65534, 65534)
    load_bundle(bundle)
    assert hashed() == 2 * first


def test_files_changed_just_now_are_not_stamped(bundle: Path, hashed: Callable[[], int],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Within the kernel's timestamp tick an edit could keep its times: never stamped."""
    monkeypatch.setattr(verified, "SETTLED_S", 3600.0)
    load_bundle(bundle)
    load_bundle(bundle)
    assert hashed() == 2 * len(json.loads((bundle / "manifest.json").read_text())["files"])
