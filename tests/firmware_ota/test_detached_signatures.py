"""Detached signatures over any binary, in the formats the OpenSSL command line produces."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from firmware_ota.detached_signatures import verify_detached
from firmware_ota.release_keys import ReleaseKey
from tests.firmware_ota.signing_fixtures import SigningKey, imgtool_key, sign_detached
from twin.errors import ArtifactRejected

KEY_TYPES = ("ed25519", "ecdsa-p256")
DATA = os.urandom(4096)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    directory = tmp_path_factory.mktemp("keys")
    return {key_type: imgtool_key(directory, key_type) for key_type in KEY_TYPES}


@pytest.fixture(scope="module")
def others(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    """Keys of the same types that are never registered."""
    directory = tmp_path_factory.mktemp("other-keys")
    return {key_type: imgtool_key(directory, key_type) for key_type in KEY_TYPES}


def registered(keys: dict[str, SigningKey]) -> list[ReleaseKey]:
    return [key.release_key for key in keys.values()]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signature_verifies_with_the_signing_key_among_several(
    keys: dict[str, SigningKey], key_type: str
) -> None:
    signature = sign_detached(DATA, keys[key_type])

    assert verify_detached(DATA, signature, registered(keys)) == keys[key_type].release_key


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command line")
@pytest.mark.parametrize(
    ("key_type", "command"),
    [
        ("ed25519", ["openssl", "pkeyutl", "-sign", "-rawin", "-inkey", "{key}", "-in", "{data}"]),
        ("ecdsa-p256", ["openssl", "dgst", "-sha256", "-sign", "{key}", "{data}"]),
    ],
)
def test_openssl_command_line_signatures_verify(
    keys: dict[str, SigningKey], key_type: str, command: list[str], tmp_path: Path
) -> None:
    data_path = tmp_path / "firmware.bin"
    data_path.write_bytes(DATA)
    arguments = [a.format(key=keys[key_type].pem_path, data=data_path) for a in command]

    signature = subprocess.run(arguments, check=True, capture_output=True).stdout

    assert verify_detached(DATA, signature, registered(keys)) == keys[key_type].release_key


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_tampered_data_is_refused(keys: dict[str, SigningKey], key_type: str) -> None:
    signature = sign_detached(DATA, keys[key_type])
    tampered = bytes([DATA[0] ^ 1]) + DATA[1:]

    with pytest.raises(ArtifactRejected, match="does not verify with any registered release key"):
        verify_detached(tampered, signature, registered(keys))


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_signature_by_an_unregistered_key_is_refused(
    keys: dict[str, SigningKey], others: dict[str, SigningKey], key_type: str
) -> None:
    signature = sign_detached(DATA, others[key_type])

    with pytest.raises(ArtifactRejected, match="does not verify with any registered release key"):
        verify_detached(DATA, signature, registered(keys))


def test_ecdsa_signature_must_be_der_encoded(keys: dict[str, SigningKey]) -> None:
    r, s = decode_dss_signature(sign_detached(DATA, keys["ecdsa-p256"]))
    raw = r.to_bytes(32, "big") + s.to_bytes(32, "big")

    with pytest.raises(ArtifactRejected, match="does not verify"):
        verify_detached(DATA, raw, registered(keys))


@pytest.mark.parametrize(
    "signature", [b"\x00" * 64, b"\x30\x06\x02\x01\x01\x02\x01\x01", os.urandom(1000), b"\x30"]
)
def test_garbage_signatures_are_refused(keys: dict[str, SigningKey], signature: bytes) -> None:
    with pytest.raises(ArtifactRejected, match="does not verify"):
        verify_detached(DATA, signature, registered(keys))


def test_empty_signature_is_refused(keys: dict[str, SigningKey]) -> None:
    with pytest.raises(ArtifactRejected, match="signature is empty"):
        verify_detached(DATA, b"", registered(keys))


def test_nothing_verifies_without_registered_keys(keys: dict[str, SigningKey]) -> None:
    with pytest.raises(ArtifactRejected, match="no release keys are registered"):
        verify_detached(DATA, sign_detached(DATA, keys["ed25519"]), [])
