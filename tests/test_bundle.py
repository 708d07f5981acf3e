"""runtime.bundle: hashes, signatures, joints and format are verified before any model loads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_export import JOINTS, export_tiny

from export.signing import keygen, sign_bundle
from runtime.bundle import BundleError, canonical_manifest_bytes, load_bundle


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """One signed fp32 bundle, its signing key and a second (wrong) key."""
    root = tmp_path_factory.mktemp("bundles")
    key, _ = keygen(root / "keys" / "good.key")
    other, _ = keygen(root / "keys" / "other.key")
    return export_tiny(root / "signed", sign_key=key), key, other


@pytest.fixture
def bundle(built: tuple[Path, Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[0], tmp_path / "bundle"))


def _edit_manifest(path: Path, **changes: object) -> None:
    data = json.loads((path / "manifest.json").read_text())
    data.update(changes)
    (path / "manifest.json").write_text(json.dumps(data, indent=4))


def test_good_bundle_loads_with_signature(bundle: Path, built: tuple[Path, Path, Path]) -> None:
    b = load_bundle(bundle, f"{built[1]}.pub", JOINTS)
    assert b.signed and b.manifest.robot.joints == JOINTS
    assert b.model_path("follower") == bundle / "follower.onnx"
    assert b.tokenizer_path.is_file()


def test_reformatted_manifest_keeps_its_signature(bundle: Path,
                                                  built: tuple[Path, Path, Path]) -> None:
    _edit_manifest(bundle)  # same content, other indentation and key order
    assert load_bundle(bundle, f"{built[1]}.pub").signed


def test_tampered_model_is_refused_naming_the_file(bundle: Path) -> None:
    with (bundle / "follower.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match=r"follower\.onnx: sha256 .* files\.follower\.onnx"):
        load_bundle(bundle)


def test_missing_file_is_refused(bundle: Path) -> None:
    (bundle / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match=r"tokenizer\.json: missing .*files\.tokenizer\.json"):
        load_bundle(bundle)


def test_unhashed_model_file_is_refused(bundle: Path) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    del data["files"]["planner.onnx"]
    (bundle / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(BundleError, match=r"models.planner.file 'planner.onnx' has no sha256"):
        load_bundle(bundle)


def test_file_outside_the_bundle_is_refused(bundle: Path) -> None:
    _edit_manifest(bundle, tokenizer="../tokenizer.json")
    with pytest.raises(BundleError, match=r"tokenizer: .*not a relative path inside the bundle"):
        load_bundle(bundle)


def test_changed_manifest_breaks_the_signature(bundle: Path,
                                               built: tuple[Path, Path, Path]) -> None:
    _edit_manifest(bundle, rates={"planner_hz": 50.0, "follower_hz": 500.0})
    load_bundle(bundle)  # still a well-formed bundle without a key...
    with pytest.raises(BundleError, match=r"manifest.sig: signature does not verify"):
        load_bundle(bundle, f"{built[1]}.pub")  # ...but not the one that was signed


def test_wrong_key_is_refused(bundle: Path, built: tuple[Path, Path, Path]) -> None:
    with pytest.raises(BundleError, match=r"signature does not verify against .*other.key.pub"):
        load_bundle(bundle, f"{built[2]}.pub")


def test_garbage_signature_is_refused(bundle: Path, built: tuple[Path, Path, Path]) -> None:
    (bundle / "manifest.sig").write_text("not base64!\n")
    with pytest.raises(BundleError, match=r"manifest.sig: not base64"):
        load_bundle(bundle, f"{built[1]}.pub")


def test_missing_signature_is_refused_when_a_key_is_required(
        bundle: Path, built: tuple[Path, Path, Path]) -> None:
    (bundle / "manifest.sig").unlink()
    load_bundle(bundle)  # no key configured: no signature needed
    with pytest.raises(BundleError, match=r"manifest.sig: missing; a signature is required"):
        load_bundle(bundle, f"{built[1]}.pub")


def test_resigned_bundle_verifies_with_the_new_key(bundle: Path,
                                                   built: tuple[Path, Path, Path]) -> None:
    sign_bundle(bundle, built[2])
    assert load_bundle(bundle, f"{built[2]}.pub").signed
    with pytest.raises(BundleError, match=r"signature does not verify"):
        load_bundle(bundle, f"{built[1]}.pub")


def test_joint_mismatch_is_refused(bundle: Path) -> None:
    swapped = [JOINTS[1], JOINTS[0], *JOINTS[2:]]
    with pytest.raises(BundleError, match=r"robot.joints .* do not match the robot config"):
        load_bundle(bundle, expect_joints=swapped)


def test_unknown_format_version_is_refused(bundle: Path) -> None:
    _edit_manifest(bundle, format_version=2)
    with pytest.raises(BundleError, match=r"format_version 2 is not supported"):
        load_bundle(bundle)


def test_schema_error_names_the_field(bundle: Path) -> None:
    _edit_manifest(bundle, horizon=0)
    with pytest.raises(BundleError, match=r"horizon: Input should be greater than 0"):
        load_bundle(bundle)


def test_model_io_must_match_the_contract(bundle: Path) -> None:
    _edit_manifest(bundle, horizon=12)  # the planner graph outputs 10 waypoints
    with pytest.raises(BundleError, match=r"models.planner.outputs.waypoints: .*expected"):
        load_bundle(bundle)


def test_unreadable_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest.json: cannot read"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json: not valid JSON"):
        load_bundle(tmp_path)


def test_canonical_bytes_ignore_layout_not_values() -> None:
    a = canonical_manifest_bytes({"b": 1, "a": [1, 2]})
    assert a == canonical_manifest_bytes({"a": [1, 2], "b": 1})
    assert a != canonical_manifest_bytes({"a": [1, 2], "b": 2})
