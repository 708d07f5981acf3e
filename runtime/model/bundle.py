"""Policy bundles: a folder with `manifest.json`, the ONNX models, tokenizers and a parity set.

`load_bundle` is what the robot calls before it loads any model: it reads the manifest as
hostile input (size, nesting, encoding), checks the format version, the ed25519 signature over
the canonical manifest bytes (when a public key is configured), the schema, that every listed
file is a regular file inside the bundle with the listed sha256, and that the contract's
joints exist on the robot. Any failure raises `BundleError` naming the file and the field.

Format 2 carries the model contract (runtime/model/contract.py) itself. Format 1 (the shipped
reference bundle) lists the fixed reference I/O; it is read into the same contract, so the
rest of the runtime sees one kind of bundle. Robot code: no torch, no onnx import here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from runtime.model.bundle_files import (
    BundleFile,
    ModelSpec,
    Precision,
    TensorSpec,
    plain_file_name,
)
from runtime.model.contract import (
    Actions,
    CameraInput,
    Contract,
    Follower,
    FollowerProprio,
    InstructionInput,
    Output,
    Planner,
    ProprioInput,
    Rates,
    ReferenceInput,
    ResidualOutput,
    Stage,
)
from runtime.model.onnx_refs import OnnxRefError, external_locations
from runtime.model.verified import Stamp, hash_file

FORMAT_VERSION = 2  # what the exporter writes
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
MAX_MANIFEST_BYTES = 1 << 20

__all__ = ["FORMAT_VERSION", "MANIFEST", "SIGNATURE", "Bundle", "BundleError", "ModelSpec",
           "TensorSpec", "load_bundle", "sha256_file"]


class BundleError(Exception):
    """A bundle that must not be loaded; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Provenance(_Strict):
    tool: str
    tool_version: str
    opset: int
    torch_version: str | None = None
    onnxruntime_version: str | None = None
    checkpoints: dict[str, str]  # model name -> sha256 of the source checkpoint
    created: str  # ISO 8601, UTC


class ParitySpec(_Strict):
    """Stored reference inputs + source outputs, and the tolerance per model."""

    file: BundleFile
    max_abs: dict[str, float]  # model name -> allowed max |onnx - reference| (rad)
    # model name -> allowed max |onnx - reference| / max |reference| of its features and
    # velocity outputs (absent: they are judged by max_abs too)
    max_rel: dict[str, float] = Field(default_factory=dict)


def _hashes(files: dict[str, str]) -> dict[str, str]:
    for name, digest in files.items():
        plain_file_name(name)
        if name in {MANIFEST, SIGNATURE}:
            raise ValueError(f"{name} cannot hash itself")
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ValueError(f"{name}: {digest!r} is not a lowercase sha256 hex digest")
    return files


class ManifestV2(_Strict):
    format_version: Literal[2]
    version: str = Field(min_length=1, max_length=200)  # e.g. 20250101-120000-ab12cd34
    contract: Contract
    parity: ParitySpec | None = None
    files: dict[str, str] = Field(max_length=1000)  # file name -> sha256 hex
    provenance: Provenance

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str]) -> dict[str, str]:
        return _hashes(files)


# ---------------------------------------------------------------------- format 1
class _Models1(_Strict):
    planner: ModelSpec
    follower: ModelSpec


class _Robot1(_Strict):
    joints: list[str] = Field(min_length=1)
    position_unit: Literal["rad"] = "rad"
    velocity_unit: Literal["rad/s"] = "rad/s"


class _Lookahead1(_Strict):
    steps: int = Field(gt=0)
    dt_s: float = Field(gt=0)


class _Rates1(_Strict):
    planner_hz: float = Field(gt=0)
    follower_hz: float = Field(gt=0)


class ManifestV1(_Strict):
    """The reference bundle's fixed I/O: image + tokens + q -> waypoints; ref + q + dq ->
    residual."""

    format_version: Literal[1]
    version: str
    robot: _Robot1
    models: _Models1
    rates: _Rates1
    horizon: int = Field(gt=0)
    dt_s: float = Field(gt=0)
    lookahead: _Lookahead1
    normalisation: str
    tokenizer: BundleFile
    parity: ParitySpec | None = None
    files: dict[str, str]
    provenance: Provenance

    @field_validator("files")
    @classmethod
    def _files(cls, files: dict[str, str]) -> dict[str, str]:
        return _hashes(files)

    def contract(self) -> Contract:
        p, f = self.models.planner, self.models.follower
        image = p.input("image").shape
        return Contract(
            rates=Rates(planner_hz=self.rates.planner_hz, follower_hz=self.rates.follower_hz),
            planner=Planner(
                stages=[Stage(name="planner", file=p.file, precision=p.precision, inputs=[
                    CameraInput(role="camera", name="image", camera="scene",
                                height=image[1], width=image[2]),
                    InstructionInput(role="instruction", name="tokens",
                                     tokenizer=self.tokenizer, kind="duet-words",
                                     max_len=p.input("tokens").shape[1]),
                    ProprioInput(role="proprio", name="q", field="q"),
                ], outputs=[Output(name="waypoints", role="actions")])],
                actions=Actions(horizon=self.horizon, dt_s=self.dt_s, kind="absolute",
                                joints=list(self.robot.joints))),
            follower=Follower(file=f.file, precision=f.precision, inputs=[
                ReferenceInput(role="reference", name="ref", steps=self.lookahead.steps,
                               dt_s=self.lookahead.dt_s),
                FollowerProprio(role="proprio", name="q", field="q"),
                FollowerProprio(role="proprio", name="dq", field="dq"),
            ], output=ResidualOutput(name="residual")))


# ---------------------------------------------------------------------- the bundle
@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: ManifestV1 | ManifestV2
    contract: Contract
    signed: bool  # the signature was checked against a configured public key

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def files(self) -> dict[str, str]:
        return self.manifest.files

    @property
    def parity(self) -> ParitySpec | None:
        return self.manifest.parity

    def stage_spec(self, stage: Stage) -> ModelSpec:
        ins, outs = self.contract.stage_tensors(stage)
        return ModelSpec(file=stage.file, precision=stage.precision, inputs=ins, outputs=outs)

    def follower_spec(self) -> ModelSpec | None:
        f = self.contract.follower
        if f is None:
            return None
        ins, outs = self.contract.follower_tensors()
        return ModelSpec(file=f.file, precision=f.precision, inputs=ins, outputs=outs)

    def model_specs(self) -> dict[str, ModelSpec]:
        """Every model by name: the planner's stages, and `follower`."""
        specs = {s.name: self.stage_spec(s) for s in self.contract.planner.stages}
        follower = self.follower_spec()
        if follower is not None:
            specs["follower"] = follower
        return specs

    def precision(self) -> Precision:
        return self.contract.planner.stages[0].precision

    @property
    def parity_path(self) -> Path | None:
        parity = self.manifest.parity
        return None if parity is None else self.path / parity.file


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_manifest_bytes(data: dict[str, Any]) -> bytes:
    """The bytes that are signed: sorted keys, no whitespace, UTF-8. Reformatting the JSON
    file (indentation, key order) does not break the signature; changing a value does."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _verify_signature(bundle_dir: Path, data: dict[str, Any], public_key: str) -> None:
    # cryptography is a robot dependency; imported here to keep `import runtime.model.bundle` cheap.
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key

    key_path = Path(public_key)
    try:
        key = load_pem_public_key(key_path.read_bytes())
    except (OSError, ValueError) as exc:
        raise BundleError(f"public key {key_path}: cannot load: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(f"public key {key_path}: not an ed25519 key")
    sig_path = bundle_dir / SIGNATURE
    if not sig_path.is_file():
        raise BundleError(f"{sig_path}: missing; a signature is required (public key configured)")
    try:
        signature = base64.b64decode(sig_path.read_bytes().strip(), validate=True)
    except ValueError:
        raise BundleError(f"{sig_path}: not base64") from None
    try:
        key.verify(signature, canonical_manifest_bytes(data))
    except InvalidSignature:
        raise BundleError(
            f"{sig_path}: signature does not verify against {key_path} "
            "(manifest changed or signed with another key)"
        ) from None


def read_manifest(manifest_path: Path) -> dict[str, Any]:
    """The manifest as plain JSON data; hostile files are BundleErrors, never tracebacks."""
    try:
        with manifest_path.open("rb") as f:
            raw = f.read(MAX_MANIFEST_BYTES + 1)
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read: {exc.strerror}") from None
    return parse_manifest(raw, manifest_path)


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook that refuses a key given twice: Python keeps the last, another
    reader may keep the first, and a manifest must mean one thing to every tool."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_manifest(raw: bytes, manifest_path: Path) -> dict[str, Any]:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise BundleError(f"{manifest_path}: larger than {MAX_MANIFEST_BYTES} bytes")
    try:
        data = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
        json.dumps(data, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except RecursionError:
        raise BundleError(f"{manifest_path}: nested too deeply") from None
    except _DuplicateKey as exc:
        raise BundleError(f"{manifest_path}: key {exc.key!r} appears twice in one object"
                          ) from None
    except (ValueError, UnicodeError) as exc:  # JSONDecodeError is a ValueError
        raise BundleError(f"{manifest_path}: not valid UTF-8 JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path}: top level must be an object")
    return data


def validate_manifest(data: dict[str, Any], manifest_path: Path) -> ManifestV1 | ManifestV2:
    """The manifest's schema for its format version; BundleError naming each field."""
    version = data.get("format_version")
    if type(version) is not int or version not in READABLE_FORMATS:
        raise BundleError(f"{manifest_path}: format_version {version!r} is not supported "
                          f"(this runtime reads {', '.join(map(str, READABLE_FORMATS))})")
    model: type[ManifestV1] | type[ManifestV2] = ManifestV1 if version == 1 else ManifestV2
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        lines = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
                 for err in exc.errors()]
        raise BundleError(f"{manifest_path}: invalid manifest:\n  " + "\n  ".join(lines[:20])
                          ) from None
    except (ValueError, RecursionError) as exc:
        raise BundleError(f"{manifest_path}: invalid manifest: {exc}") from None


def _check_files(bundle_dir: Path, manifest: ManifestV1 | ManifestV2, contract: Contract,
                 manifest_path: Path, manifest_sha256: str) -> None:
    needed = contract.files() + ([manifest.parity.file] if manifest.parity else [])
    for name in needed:
        if name not in manifest.files:
            raise BundleError(f"{manifest_path}: {name!r} is used but has no sha256 in files")
    root = bundle_dir.resolve()
    for name in manifest.files:
        file_path = bundle_dir / name
        if file_path.is_symlink() or not file_path.is_file():
            raise BundleError(f"{file_path}: missing or not a regular file (listed in "
                              f"{MANIFEST} files.{name})")
        if root not in file_path.resolve().parents:
            raise BundleError(f"{file_path}: outside the bundle")
    stamp = Stamp(bundle_dir, manifest_sha256)
    if not stamp.trusted(list(manifest.files)):  # hashed by root since boot, unchanged
        identities = {}
        for name, digest in manifest.files.items():
            file_path = bundle_dir / name
            actual, identities[name] = hash_file(file_path)
            if actual != digest:
                raise BundleError(
                    f"{file_path}: sha256 {actual[:16]}… does not match {MANIFEST} "
                    f"files.{name} {digest[:16]}… (file modified or corrupt)")
        stamp.record(identities)
    for name in contract.model_files():
        _check_external_data(bundle_dir, name, manifest.files, manifest_path)


def _check_external_data(bundle_dir: Path, name: str, listed: dict[str, str],
                         manifest_path: Path) -> None:
    """Every file the graph makes ONNX Runtime read (external data, relative to the graph's
    folder) is listed, so hashed and signed: weights nobody checked are never loaded."""
    graph = bundle_dir / name
    try:
        locations = external_locations(graph)
    except (OSError, OnnxRefError) as exc:
        raise BundleError(f"{graph}: not a readable ONNX graph: {exc}") from None
    for location in sorted(locations):
        key = str(PurePosixPath(name).parent / location)
        try:
            plain_file_name(key)  # absolute, `..`, backslashes: refused
        except ValueError:
            raise BundleError(f"{graph}: external data {location!r} is not a file inside the "
                              "bundle") from None
        if key not in listed:
            raise BundleError(f"{graph}: its weights are in {key!r}, which {MANIFEST} does not "
                              "list in files (unhashed, unsigned weights are never loaded)")


def _check_v1_tensors(m: ManifestV1, contract: Contract, where: Path) -> None:
    """A format-1 manifest lists its tensors; they must be the fixed reference I/O."""
    want = {"planner": contract.stage_tensors(contract.planner.stages[0]),
            "follower": contract.follower_tensors()}
    for name, (ins, outs) in want.items():
        spec: ModelSpec = getattr(m.models, name)
        for kind, declared, derived in (("inputs", spec.inputs, ins),
                                        ("outputs", spec.outputs, outs)):
            if sorted(declared, key=lambda t: t.name) != sorted(derived, key=lambda t: t.name):
                raise BundleError(
                    f"{where}: models.{name}.{kind}: "
                    f"{[(t.name, t.dtype, t.shape) for t in declared]}, expected "
                    f"{[(t.name, t.dtype, t.shape) for t in derived]}")


def load_bundle(path: str | Path, public_key: str | None = None,
                expect_joints: list[str] | None = None) -> Bundle:
    """Verify and load the bundle at `path`. Raises BundleError naming file and field.

    `expect_joints`: the robot's joints; every joint the contract names must be one of them
    (format 1: exactly them, in order)."""
    bundle_dir = Path(path)
    manifest_path = bundle_dir / MANIFEST
    data = read_manifest(manifest_path)
    if data.get("format_version") not in READABLE_FORMATS:
        validate_manifest(data, manifest_path)  # the error, before any signature check
    # Authenticity before anything else in the manifest is trusted.
    if public_key is not None:
        _verify_signature(bundle_dir, data, public_key)
    manifest = validate_manifest(data, manifest_path)
    try:
        contract = manifest.contract() if isinstance(manifest, ManifestV1) \
            else manifest.contract
    except (ValidationError, KeyError, StopIteration) as exc:
        raise BundleError(f"{manifest_path}: not the reference I/O: {exc}") from None
    _check_files(bundle_dir, manifest, contract, manifest_path,
                 hashlib.sha256(canonical_manifest_bytes(data)).hexdigest())
    if isinstance(manifest, ManifestV1):
        _check_v1_tensors(manifest, contract, manifest_path)
        if expect_joints is not None and list(expect_joints) != manifest.robot.joints:
            raise BundleError(f"{manifest_path}: robot.joints {', '.join(manifest.robot.joints)}"
                              " do not match the robot config's joints "
                              f"{', '.join(expect_joints)}")
    elif expect_joints is not None:
        unknown = [j for j in contract.joints() if j not in expect_joints]
        if unknown:
            raise BundleError(f"{manifest_path}: the contract names joints the robot lacks: "
                              f"{', '.join(unknown)} (robot.joints: {', '.join(expect_joints)})")
    return Bundle(path=bundle_dir, manifest=manifest, contract=contract,
                  signed=public_key is not None)
