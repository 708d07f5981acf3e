"""CURVE key pairs for the off-board planner: `duet keys generate`, and loading them with the
checks ssh makes of its keys.

Files are ZeroMQ certificates (czmq's format, read and written by pyzmq's `zmq.auth`):
`NAME.key` holds the public key (hand it out: the server's to its robots, each robot's to the
server's allow-list directory), `NAME.key_secret` both keys (mode 0600, never leaves the host).
A secret file that others may read, or a key that is not 32 bytes of Z85, is refused at start
with the file and the reason.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth

MAX_KEY_FILE_BYTES = 4096
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_Z85 = re.compile(rb"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


class KeyFileError(Exception):
    """A key file that cannot be used; the message names the file and the reason."""


@dataclass(frozen=True)
class KeyPair:
    public: bytes  # Z85, 40 characters
    secret: bytes


def generate(name: str, out_dir: str | Path) -> tuple[Path, Path]:
    """Write NAME.key (0644) and NAME.key_secret (0600) into `out_dir`; never overwrites."""
    if not NAME.match(name):
        raise KeyFileError(f"key name {name!r}: letters, digits, '.', '_', '-' (at most 64)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    public, secret = out / f"{name}.key", out / f"{name}.key_secret"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path}: exists; refusing to replace a key (remove it first)")
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(str(out), name)
    finally:
        os.umask(old)
    public.chmod(0o644)
    return public, secret


def _read(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    try:
        st = path.stat()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise KeyFileError(f"{path}: not a regular file")
    if st.st_size > MAX_KEY_FILE_BYTES:
        raise KeyFileError(f"{path}: {st.st_size} bytes; a key file is at most "
                           f"{MAX_KEY_FILE_BYTES}")
    if secret:
        if st.st_mode & 0o077:
            raise KeyFileError(f"{path}: mode {stat.S_IMODE(st.st_mode):04o} lets others read "
                            f"the secret key; chmod 600 {path}")
        if st.st_uid not in (0, os.geteuid()):
            raise KeyFileError(f"{path}: owned by uid {st.st_uid}, not by this user "
                            f"(uid {os.geteuid()}) or root")
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise KeyFileError(f"{path}: not a ZeroMQ certificate: {exc}") from None
    for what, key in (("public-key", public), ("secret-key", secret_key)):
        if key is not None and not _Z85.match(key):
            raise KeyFileError(f"{path}: {what} is not 40 characters of Z85 (a 32-byte key)")
    return public, secret_key


def load_public(path: str | Path) -> bytes:
    """The Z85 public key of a certificate (public or secret file)."""
    return _read(Path(path), secret=False)[0]


def load_pair(path: str | Path) -> KeyPair:
    """Both keys from a secret certificate, which only its owner may read."""
    public, secret = _read(Path(path), secret=True)
    if secret is None:
        raise KeyFileError(f"{path}: holds no secret-key (give the .key_secret file)")
    if zmq.curve_public(secret) != public:
        raise KeyFileError(f"{path}: the public key does not belong to the secret key")
    return KeyPair(public, secret)


def load_allow_list(directory: str | Path) -> dict[bytes, str]:
    """Public key (Z85) -> robot name (the file's stem) for every *.key in `directory`."""
    path = Path(directory)
    if not path.is_dir():
        raise KeyFileError(f"{path}: not a directory of robots' public keys (*.key)")
    out: dict[bytes, str] = {}
    for file in sorted(path.glob("*.key")):
        key = load_public(file)
        if key in out:
            raise KeyFileError(f"{file}: the same key as {out[key]}.key")
        out[key] = file.stem
    return out
