"""Test helpers that sign like release engineers do: keys and images from the real imgtool,
detached signatures in the OpenSSL command line's formats."""

from __future__ import annotations

import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from firmware_ota.release_keys import ReleaseKey, parse_public_key

# The console script installed beside the interpreter running the tests (the venv's).
IMGTOOL = str(Path(sys.executable).with_name("imgtool"))
IMAGE_OPTIONS = ("--header-size", "0x200", "--align", "4", "--slot-size", "0x20000")


@dataclass(frozen=True)
class SigningKey:
    """A private key file as `imgtool keygen` writes it, and its registered public half."""

    pem_path: Path
    private_key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey
    release_key: ReleaseKey


def imgtool(*args: str) -> bytes:
    """Run imgtool with `args`; its standard output."""
    return subprocess.run([IMGTOOL, *args], check=True, capture_output=True).stdout


def imgtool_key(directory: Path, key_type: str) -> SigningKey:
    """A fresh key from `imgtool keygen -t key_type` (ed25519 or ecdsa-p256)."""
    path = directory / f"{key_type}-{secrets.token_hex(4)}.pem"
    imgtool("keygen", "-k", str(path), "-t", key_type)
    private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(private_key, Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    return SigningKey(path, private_key, parse_public_key(path.read_bytes()))


def imgtool_sign(
    directory: Path,
    body: bytes,
    *options: str,
    key: Path | None = None,
    version: str = "2.1.0+7",
) -> bytes:
    """`body` made an MCUboot image by `imgtool sign` (signed with `key` when given)."""
    name = secrets.token_hex(4)
    infile, outfile = directory / f"{name}.in.bin", directory / f"{name}.out.bin"
    infile.write_bytes(body)
    key_options = ("-k", str(key)) if key is not None else ()
    imgtool(
        "sign",
        *IMAGE_OPTIONS,
        "--pad-header",
        "--version",
        version,
        *key_options,
        *options,
        str(infile),
        str(outfile),
    )
    return outfile.read_bytes()


def sign_detached(data: bytes, key: SigningKey) -> bytes:
    """A detached signature as OpenSSL makes it: pure Ed25519, or DER ECDSA with SHA-256."""
    if isinstance(key.private_key, Ed25519PrivateKey):
        return key.private_key.sign(data)
    return key.private_key.sign(data, ec.ECDSA(hashes.SHA256()))
