"""Checking device CSRs: accepted keys, refused keys, broken input, extracted claims."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import AttributeOID, NameOID

from provisioning.csr_policy import CsrFacts, inspect_csr
from twin.errors import InvalidArgument, PayloadTooLarge


def make_csr(
    key: CertificateIssuerPrivateKeyTypes,
    *,
    common_name: str | None = "lamp-0001",
    serial_numbers: tuple[str, ...] = ("HW-123",),
    challenge: bytes | None = None,
    extensions: tuple[x509.ExtensionType, ...] = (),
) -> bytes:
    """A DER CSR as a device would build it."""
    attributes = [x509.NameAttribute(NameOID.SERIAL_NUMBER, s) for s in serial_numbers]
    if common_name is not None:
        attributes.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name(attributes))
    for extension in extensions:
        builder = builder.add_extension(extension, critical=False)
    if challenge is not None:
        builder = builder.add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge)
    algorithm: Any = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    ("key", "description"),
    [
        (ec.generate_private_key(ec.SECP256R1()), "EC P-256"),
        (ec.generate_private_key(ec.SECP384R1()), "EC P-384"),
        (ed25519.Ed25519PrivateKey.generate(), "Ed25519"),
        (rsa.generate_private_key(65537, 2048), "RSA 2048"),
    ],
    ids=["p256", "p384", "ed25519", "rsa2048"],
)
def test_accepted_keys(key: CertificateIssuerPrivateKeyTypes, description: str) -> None:
    facts = inspect_csr(make_csr(key))
    assert facts.key_description == description
    assert facts.public_key == key.public_key()


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (
            ec.generate_private_key(ec.SECP521R1()),
            "EC key on secp521r1 is not accepted (use P-256, P-384, Ed25519 or RSA >= 2048)",
        ),
        (rsa.generate_private_key(65537, 1024), "RSA 1024 is too short (minimum 2048)"),
        (dsa.generate_private_key(2048), "DSA keys are not accepted"),
    ],
    ids=["p521", "rsa1024", "dsa"],
)
def test_refused_keys(key: CertificateIssuerPrivateKeyTypes, message: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        inspect_csr(make_csr(key))
    assert message in str(info.value)


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP256R1()), ed25519.Ed25519PrivateKey.generate()],
    ids=["p256", "ed25519"],
)
def test_tampered_signature_is_refused(key: CertificateIssuerPrivateKeyTypes) -> None:
    der = bytearray(make_csr(key))
    der[-1] ^= 0x01  # the signature is the last field of the CSR
    with pytest.raises(InvalidArgument, match="CSR signature does not verify"):
        inspect_csr(bytes(der))


def test_tampered_subject_is_refused() -> None:
    der = make_csr(ec.generate_private_key(ec.SECP256R1()), common_name="lamp-0001")
    tampered = der.replace(b"lamp-0001", b"lamp-0002")
    assert tampered != der
    with pytest.raises(InvalidArgument, match="CSR signature does not verify"):
        inspect_csr(tampered)


@pytest.mark.parametrize("garbage", [b"", b"not a csr", b"\x30\x03\x02\x01\x00", b"\x30" * 50])
def test_garbage_is_refused(garbage: bytes) -> None:
    with pytest.raises(InvalidArgument, match=r"^CSR is not valid DER PKCS#10: "):
        inspect_csr(garbage)


def test_oversize_is_refused_before_parsing() -> None:
    with pytest.raises(PayloadTooLarge, match="8193 bytes"):
        inspect_csr(b"\x00" * 8193)
    der = make_csr(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(PayloadTooLarge):
        inspect_csr(der, max_bytes=len(der) - 1)
    assert isinstance(inspect_csr(der, max_bytes=len(der)), CsrFacts)


def test_claims_are_extracted() -> None:
    der = make_csr(
        ec.generate_private_key(ec.SECP256R1()),
        common_name="lamp-0001",
        serial_numbers=("HW-123",),
        challenge=b"K7Q2-9XZP",
    )
    facts = inspect_csr(der)
    assert facts.serial_number == "HW-123"
    assert facts.common_name == "lamp-0001"
    assert facts.challenge_password == "K7Q2-9XZP"


def test_absent_claims_are_none() -> None:
    facts = inspect_csr(
        make_csr(ed25519.Ed25519PrivateKey.generate(), common_name=None, serial_numbers=())
    )
    assert facts.serial_number is None
    assert facts.common_name is None
    assert facts.challenge_password is None


def test_two_serial_numbers_are_refused() -> None:
    der = make_csr(ec.generate_private_key(ec.SECP256R1()), serial_numbers=("HW-1", "HW-2"))
    with pytest.raises(InvalidArgument, match="2 serialNumber attributes"):
        inspect_csr(der)


def test_requested_extensions_do_not_stop_inspection() -> None:
    # The CA ignores them (see test_certificate_authority); inspection only reports the key.
    der = make_csr(
        ec.generate_private_key(ec.SECP256R1()),
        extensions=(x509.BasicConstraints(ca=True, path_length=None),),
    )
    assert inspect_csr(der).key_description == "EC P-256"
