"""Release keys: which key files are accepted, what they are named, and MCUboot's key hash."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from firmware_ota.release_keys import (
    MAX_KEY_FILE_BYTES,
    KeyAlgorithm,
    mcuboot_key_hash,
    parse_public_key,
)
from tests.firmware_ota.signing_fixtures import SigningKey, imgtool, imgtool_key
from twin.errors import InvalidArgument

KEY_TYPES = {"ed25519": KeyAlgorithm.ED25519, "ecdsa-p256": KeyAlgorithm.ECDSA_P256}


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, SigningKey]:
    directory = tmp_path_factory.mktemp("keys")
    return {key_type: imgtool_key(directory, key_type) for key_type in KEY_TYPES}


def public_pem(key: PrivateKeyTypes) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def private_pem(key: PrivateKeyTypes, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_imgtool_private_key_file_gives_its_public_half(
    keys: dict[str, SigningKey], key_type: str
) -> None:
    key = parse_public_key(keys[key_type].pem_path.read_bytes())
    published = parse_public_key(imgtool("getpub", "-k", str(keys[key_type].pem_path), "-e", "pem"))

    assert key == published
    assert key.algorithm == KEY_TYPES[key_type]
    assert key.key_id == hashlib.sha256(key.public_key_der).hexdigest()
    assert len(key.key_id) == 64 and key.key_id == key.key_id.lower()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_pem_and_der_public_keys_give_the_same_key(
    keys: dict[str, SigningKey], key_type: str
) -> None:
    public_key = keys[key_type].private_key.public_key()
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    from_der = parse_public_key(der)
    from_pem = parse_public_key(b"\n" + public_pem(keys[key_type].private_key) + b"\n")

    assert from_der == from_pem == keys[key_type].release_key
    assert from_der.public_key_der == der
    assert parse_public_key(from_der.public_key_pem().encode()) == from_der
    assert from_der.public_key_pem().startswith("-----BEGIN PUBLIC KEY-----")


def test_public_key_objects_match_the_algorithm(keys: dict[str, SigningKey]) -> None:
    assert isinstance(keys["ed25519"].release_key.public_key(), Ed25519PublicKey)
    ecdsa_key = keys["ecdsa-p256"].release_key.public_key()
    assert isinstance(ecdsa_key, ec.EllipticCurvePublicKey)
    assert isinstance(ecdsa_key.curve, ec.SECP256R1)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_mcuboot_key_hash_is_what_imgtool_puts_in_images(
    keys: dict[str, SigningKey], key_type: str
) -> None:
    expected = imgtool("getpubhash", "-k", str(keys[key_type].pem_path), "-e", "raw")

    assert mcuboot_key_hash(keys[key_type].release_key) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            public_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            r"^RSA keys are not supported \(use Ed25519 or ECDSA P-256\)$",
        ),
        (
            private_pem(rsa.generate_private_key(public_exponent=65537, key_size=2048)),
            "RSA keys are not supported",
        ),
        (
            public_pem(ec.generate_private_key(ec.SECP384R1())),
            r"ECDSA keys on curve secp384r1 are not supported \(use Ed25519 or ECDSA P-256\)",
        ),
        (private_pem(ed448.Ed448PrivateKey.generate()), "Ed448 keys are not supported"),
        (public_pem(x25519.X25519PrivateKey.generate()), "X25519 keys are not supported"),
        (b"", "not a readable public key"),
        (b"this is not a key at all", "not a readable public key"),
        (b"\x30\x03\x02\x01\x01", "not a readable public key"),
        (b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "not a readable"),
        (b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n", "not a readable"),
        (
            private_pem(ec.generate_private_key(ec.SECP256R1()), password=b"secret"),
            "the private key is encrypted",
        ),
        (b"0" * (MAX_KEY_FILE_BYTES + 1), "key file is too large"),
    ],
    ids=[
        "rsa-public",
        "rsa-private",
        "p384",
        "ed448",
        "x25519",
        "empty",
        "text",
        "der-garbage",
        "pem-garbage",
        "certificate",
        "encrypted-private",
        "too-large",
    ],
)
def test_unsupported_or_unreadable_keys_are_refused_with_the_reason(
    data: bytes, message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        parse_public_key(data)


def test_imgtool_encryption_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x25519.pem"
    imgtool("keygen", "-k", str(path), "-t", "x25519")

    with pytest.raises(InvalidArgument, match="X25519 keys are not supported"):
        parse_public_key(path.read_bytes())
