"""ed25519 keys and bundle signatures (the robot verifies them in runtime.model.bundle)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from runtime.model.bundle import MANIFEST, SIGNATURE, canonical_manifest_bytes


class SigningError(ValueError):
    """A key that cannot be used for signing."""


def keygen(private_path: Path) -> tuple[Path, Path]:
    """Write a new private key (PEM, mode 0600) and `<private>.pub` (PEM) next to it."""
    if private_path.exists():
        raise SigningError(f"{private_path}: exists; refusing to overwrite a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    private_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    public_path = private_path.with_name(private_path.name + ".pub")
    public_path.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SigningError(f"{path}: cannot load private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path}: not an ed25519 private key")
    return key


def sign_bundle(bundle_dir: Path, private_key: Path) -> Path:
    """Sign the canonical bytes of the bundle's manifest into manifest.sig (base64)."""
    key = load_private_key(private_key)
    data = json.loads((bundle_dir / MANIFEST).read_bytes())
    signature = key.sign(canonical_manifest_bytes(data))
    sig_path = bundle_dir / SIGNATURE
    sig_path.write_bytes(base64.b64encode(signature) + b"\n")
    return sig_path
