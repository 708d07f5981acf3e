"""runtime.model.bundle: hashes, signatures, joints, format and the contract are verified before any
model loads; a hostile manifest is a BundleError, never a traceback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_export import JOINTS, export_tiny

from export.signing import keygen, sign_bundle
from runtime.model.bundle import BundleError, canonical_manifest_bytes, load_bundle
from runtime.model.engines import EngineError, make_engine

REPO = Path(__file__).resolve().parents[1]


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


def _edit_contract(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads((path / "manifest.json").read_text())
    edit(data["contract"])
    (path / "manifest.json").write_text(json.dumps(data))


def test_good_bundle_loads_with_signature(bundle: Path, built: tuple[Path, Path, Path]) -> None:
    b = load_bundle(bundle, f"{built[1]}.pub", JOINTS)
    assert b.signed and b.contract.action_joints == JOINTS
    assert set(b.model_specs()) == {"planner", "follower"}
    assert all((bundle / f).is_file() for f in b.contract.files())


def test_the_shipped_format_1_reference_bundle_still_loads() -> None:
    b = load_bundle(REPO / "bundles/reference", expect_joints=JOINTS)
    assert b.manifest.format_version == 1
    stage = b.contract.planner.stages[0]
    assert [i.role for i in stage.inputs] == ["camera", "instruction", "proprio"]
    assert b.follower_spec() is not None


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
    with pytest.raises(BundleError, match=r"'planner.onnx' is used but has no sha256"):
        load_bundle(bundle)


def test_file_outside_the_bundle_is_refused(bundle: Path) -> None:
    def escape(c: dict[str, Any]) -> None:
        c["planner"]["stages"][0]["inputs"][1]["tokenizer"] = "../tokenizer.json"

    _edit_contract(bundle, escape)
    with pytest.raises(BundleError, match=r"instruction.tokenizer: .*not a relative path inside"):
        load_bundle(bundle)


def test_a_listed_file_that_is_a_symlink_is_refused(bundle: Path, tmp_path: Path) -> None:
    outside = tmp_path / "evil.onnx"
    shutil.copyfile(bundle / "planner.onnx", outside)
    (bundle / "planner.onnx").unlink()
    (bundle / "planner.onnx").symlink_to(outside)  # same bytes, same hash: still refused
    with pytest.raises(BundleError, match=r"planner\.onnx: missing or not a regular file"):
        load_bundle(bundle)


@pytest.mark.parametrize(("text", "reason"), [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ('{"format_version": 2, "version": "\\ud800"}', "not valid UTF-8 JSON"),
    ('{"format_version": 2, "version": "\\udfff"}', "not valid UTF-8 JSON"),
    (" " * (2 << 20), "larger than"),
    ('{"format_version": true}', "format_version True is not supported"),
    ('{"format_version": 2, "contract": {"planner": ' + '{"a": ' * 5000 + "1" + "}" * 5001
     + "}", "nested too deeply|invalid manifest"),
])
def test_hostile_manifests_are_bundle_errors(tmp_path: Path, text: str, reason: str) -> None:
    (tmp_path / "manifest.json").write_text(text)
    with pytest.raises(BundleError, match=reason):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(BundleError, match="not valid UTF-8 JSON"):
        load_bundle(tmp_path)


def test_changed_manifest_breaks_the_signature(bundle: Path,
                                               built: tuple[Path, Path, Path]) -> None:
    _edit_contract(bundle, lambda c: c["rates"].update(planner_hz=50.0))
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


def test_a_joint_the_robot_lacks_is_refused(bundle: Path) -> None:
    robot = [j for j in JOINTS if j != "elbow"] + ["tail"]
    with pytest.raises(BundleError, match=r"names joints the robot lacks: elbow \(robot"):
        load_bundle(bundle, expect_joints=robot)
    load_bundle(bundle, expect_joints=[*JOINTS, "tail"])  # a subset of the robot: fine


def test_unknown_format_version_is_refused(bundle: Path) -> None:
    _edit_manifest(bundle, format_version=3)
    with pytest.raises(BundleError, match=r"format_version 3 is not supported"):
        load_bundle(bundle)


def test_schema_error_names_the_field(bundle: Path) -> None:
    _edit_contract(bundle, lambda c: c["planner"]["actions"].update(horizon=0))
    with pytest.raises(BundleError, match=r"contract.planner.actions.horizon: Input should be"):
        load_bundle(bundle)


def test_model_io_must_match_the_contract(bundle: Path) -> None:
    """The manifest is well-formed, but the planner graph outputs 10 waypoints, not 12: the
    engine is refused naming the tensor, before anything runs."""
    _edit_contract(bundle, lambda c: c["planner"]["actions"].update(horizon=12))
    b = load_bundle(bundle)
    with pytest.raises(EngineError, match=r"output 'waypoints': the contract gives float32"
                                          r"\[1, 12, 6\], the model has float32\[1, 10, 6\]"):
        make_engine(b.stage_spec(b.contract.planner.stages[0]), b)


def test_unreadable_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match=r"manifest.json: cannot read"):
        load_bundle(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match=r"manifest.json: not valid UTF-8 JSON"):
        load_bundle(tmp_path)


def test_canonical_bytes_ignore_layout_not_values() -> None:
    a = canonical_manifest_bytes({"b": 1, "a": [1, 2]})
    assert a == canonical_manifest_bytes({"a": [1, 2], "b": 1})
    assert a != canonical_manifest_bytes({"a": [1, 2], "b": 2})


def test_a_key_given_twice_is_refused_though_the_signature_holds(
        bundle: Path, built: tuple[Path, Path, Path]) -> None:
    """Python's json keeps the last of two equal keys (the signed value); another reader may
    keep the first. A manifest that means two things is refused, signature or not."""
    path = bundle / "manifest.json"
    text = path.read_text()
    path.write_text('{"version": "not-what-was-signed", ' + text.lstrip()[1:])
    with pytest.raises(BundleError, match="key 'version' appears twice in one object"):
        load_bundle(bundle, f"{built[1]}.pub")
    data = json.loads(text)
    nested = json.dumps(data)[:-1] + ', "files": ' + json.dumps(data["files"]) + "}"
    path.write_text(nested)
    with pytest.raises(BundleError, match="key 'files' appears twice"):
        load_bundle(bundle)
