"""Policy bundles: a folder with `manifest.json`, the ONNX models, the tokenizer and a parity set.

`load_bundle` is what the robot calls before it loads any model: it checks the format version,
the manifest schema, the ed25519 signature over the canonical manifest bytes (when a public key
is configured), the sha256 of every listed file, that the model I/O agrees with the fixed
contract, and that the joint names match the robot config. Any failure raises `BundleError`
with a message naming the file and the field. Robot code: no torch, no onnx import here.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"

Precision = Literal["fp32", "fp16", "int8"]
DType = Literal["uint8", "int64", "float32", "float16"]


class BundleError(Exception):
    """A bundle that must not be loaded; the message names the file and the field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _plain_file_name(value: str) -> str:
    # Files live directly inside the bundle: no absolute paths, no escaping the folder.
    p = PurePosixPath(value)
    if p.is_absolute() or ".." in p.parts or value in {"", "."} or "\\" in value:
        raise ValueError(f"{value!r} is not a relative path inside the bundle")
    return value


BundleFile = Annotated[str, AfterValidator(_plain_file_name)]


class TensorSpec(_Strict):
    name: str
    dtype: DType
    shape: list[int] = Field(min_length=1)

    @field_validator("shape")
    @classmethod
    def _static(cls, shape: list[int]) -> list[int]:
        if any(d <= 0 for d in shape):
            raise ValueError(f"shape {shape} must be static and positive")
        return shape


class ModelSpec(_Strict):
    file: BundleFile
    precision: Precision
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name)

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name)


def _by_name(specs: list[TensorSpec], name: str) -> TensorSpec:
    for spec in specs:
        if spec.name == name:
            return spec
    raise KeyError(name)


class Models(_Strict):
    planner: ModelSpec
    follower: ModelSpec


class RobotSpec(_Strict):
    joints: list[str] = Field(min_length=1)
    position_unit: Literal["rad"] = "rad"
    velocity_unit: Literal["rad/s"] = "rad/s"


class Rates(_Strict):
    planner_hz: float = Field(gt=0)
    follower_hz: float = Field(gt=0)


class Lookahead(_Strict):
    steps: int = Field(gt=0)
    dt_s: float = Field(gt=0)


class Provenance(_Strict):
    tool: str
    tool_version: str
    opset: int
    torch_version: str | None = None
    onnxruntime_version: str | None = None
    checkpoints: dict[str, str]  # model name -> sha256 of the source checkpoint
    created: str  # ISO 8601, UTC


class ParitySpec(_Strict):
    """Stored reference inputs + fp32 PyTorch outputs, and the tolerance for this precision."""

    file: BundleFile
    max_abs: dict[str, float]  # model name -> allowed max |onnx - reference| in output units


class Manifest(_Strict):
    format_version: int
    version: str  # human-readable bundle id, e.g. 20250101-120000-ab12cd34
    robot: RobotSpec
    models: Models
    rates: Rates
    horizon: int = Field(gt=0)
    dt_s: float = Field(gt=0)
    lookahead: Lookahead
    normalisation: str
    tokenizer: BundleFile
    parity: ParitySpec | None = None
    files: dict[str, str]  # file name -> sha256 hex
    provenance: Provenance

    @field_validator("files")
    @classmethod
    def _hashes(cls, files: dict[str, str]) -> dict[str, str]:
        for name, digest in files.items():
            _plain_file_name(name)
            if name in {MANIFEST, SIGNATURE}:
                raise ValueError(f"{name} cannot hash itself")
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"{name}: {digest!r} is not a lowercase sha256 hex digest")
        return files


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: Manifest
    signed: bool  # the signature was checked against a configured public key

    def model_path(self, name: Literal["planner", "follower"]) -> Path:
        return self.path / getattr(self.manifest.models, name).file

    @property
    def tokenizer_path(self) -> Path:
        return self.path / self.manifest.tokenizer

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
    # cryptography is a robot dependency; imported here to keep `import runtime.bundle` cheap.
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


def _check_contract(m: Manifest, where: Path) -> None:
    """Model I/O must agree with the manifest's own robot/horizon/lookahead fields."""
    d = len(m.robot.joints)
    # model -> (inputs, outputs), each name -> (dtype, shape or None when free)
    Io = dict[str, tuple[str, "list[int] | None"]]
    expected: dict[str, tuple[Io, Io]] = {
        "planner": (
            {"image": ("uint8", None), "tokens": ("int64", None), "q": ("float32", [1, d])},
            {"waypoints": ("float32", [1, m.horizon, d])},
        ),
        "follower": (
            {
                "ref": ("float32", [1, m.lookahead.steps, d]),
                "q": ("float32", [1, d]),
                "dq": ("float32", [1, d]),
            },
            {"residual": ("float32", [1, d])},
        ),
    }
    for model_name, (ins, outs) in expected.items():
        spec: ModelSpec = getattr(m.models, model_name)
        for kind, want, have in (("inputs", ins, spec.inputs), ("outputs", outs, spec.outputs)):
            names = sorted(t.name for t in have)
            if names != sorted(want):
                raise BundleError(
                    f"{where}: models.{model_name}.{kind}: names {names}, expected {sorted(want)}"
                )
            for t in have:
                dtype, shape = want[t.name]
                if t.dtype != dtype or (shape is not None and t.shape != shape):
                    raise BundleError(
                        f"{where}: models.{model_name}.{kind}.{t.name}: {t.dtype}{t.shape}, "
                        f"expected {dtype}{shape if shape is not None else ''}"
                    )


def load_bundle(
    path: str | Path,
    public_key: str | None = None,
    expect_joints: list[str] | None = None,
) -> Bundle:
    """Verify and load the bundle at `path`. Raises BundleError naming file and field."""
    bundle_dir = Path(path)
    manifest_path = bundle_dir / MANIFEST
    try:
        raw = manifest_path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{manifest_path}: cannot read: {exc.strerror}") from None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise BundleError(f"{manifest_path}: not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BundleError(f"{manifest_path}: top level must be an object")
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {version!r} is not supported "
            f"(this runtime reads {FORMAT_VERSION})"
        )
    # Authenticity before anything else in the manifest is trusted.
    if public_key is not None:
        _verify_signature(bundle_dir, data, public_key)
    try:
        manifest = Manifest.model_validate(data)
    except ValidationError as exc:
        lines = [
            f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}"
            for err in exc.errors()
        ]
        raise BundleError(f"{manifest_path}: invalid manifest:\n  " + "\n  ".join(lines)) from None

    needed = {
        "models.planner.file": manifest.models.planner.file,
        "models.follower.file": manifest.models.follower.file,
        "tokenizer": manifest.tokenizer,
    }
    if manifest.parity is not None:
        needed["parity.file"] = manifest.parity.file
    for field, name in needed.items():
        if name not in manifest.files:
            raise BundleError(f"{manifest_path}: {field} {name!r} has no sha256 in files")
    for name, digest in manifest.files.items():
        file_path = bundle_dir / name
        if not file_path.is_file():
            raise BundleError(f"{file_path}: missing (listed in {MANIFEST} files.{name})")
        actual = sha256_file(file_path)
        if actual != digest:
            raise BundleError(
                f"{file_path}: sha256 {actual[:16]}… does not match {MANIFEST} "
                f"files.{name} {digest[:16]}… (file modified or corrupt)"
            )

    _check_contract(manifest, manifest_path)
    if expect_joints is not None and list(expect_joints) != manifest.robot.joints:
        raise BundleError(
            f"{manifest_path}: robot.joints {manifest.robot.joints} do not match the robot "
            f"config's joints {list(expect_joints)}"
        )
    return Bundle(path=bundle_dir, manifest=manifest, signed=public_key is not None)
