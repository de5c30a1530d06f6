"""What a device's PKCS#10 certificate signing request must look like before the CA signs it.

Pure functions: DER bytes in, `CsrFacts` out (or an `InvalidArgument` saying why not). The CA
takes only the public key from a CSR; the subject and challengePassword are extracted so the
enrollment layer can match them against what an installer registered, never to be copied into
a certificate.
"""

from __future__ import annotations

from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.x509.oid import AttributeOID, NameOID

from twin.errors import InvalidArgument, PayloadTooLarge

# Largest DER CSR taken by default: an RSA 4096 CSR with a few attributes is ~1.7 KB, so 8 KiB
# leaves room for odd but honest requests while bounding what an unauthenticated peer can send.
DEFAULT_MAX_CSR_BYTES = 8192

MIN_RSA_BITS = 2048

# Curve object name -> the name people use for it. Only these two: they are what device secure
# elements (ATECC608, SE050, TPMs) and every TLS stack support, and what the fleet CA signs with.
_ACCEPTED_CURVES: dict[str, str] = {
    ec.SECP256R1.name: "P-256",
    ec.SECP384R1.name: "P-384",
}

_ACCEPTED_LIST = "use P-256, P-384, Ed25519 or RSA >= 2048"


@dataclass(frozen=True)
class CsrFacts:
    """What the CA may use from a checked CSR: its key, and the claims an enrollment is matched
    against (serial number, common name, one-time enrollment code)."""

    public_key: CertificateIssuerPublicKeyTypes
    key_description: str
    serial_number: str | None
    common_name: str | None
    challenge_password: str | None


def check_public_key(key: CertificatePublicKeyTypes) -> str:
    """Return a short description of `key` (e.g. "EC P-256") if the fleet accepts it.

    Raises `InvalidArgument` naming the key when it is not one of: EC on P-256 or P-384,
    Ed25519, RSA with a modulus of at least 2048 bits.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        curve = key.curve.name
        if curve not in _ACCEPTED_CURVES:
            raise InvalidArgument(f"EC key on {curve} is not accepted ({_ACCEPTED_LIST})")
        return f"EC {_ACCEPTED_CURVES[curve]}"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise InvalidArgument(f"RSA {key.key_size} is too short (minimum {MIN_RSA_BITS})")
        return f"RSA {key.key_size}"
    if isinstance(key, dsa.DSAPublicKey):
        raise InvalidArgument(f"DSA keys are not accepted ({_ACCEPTED_LIST})")
    if isinstance(key, ed448.Ed448PublicKey):
        # Sound, but rarely supported by device TLS stacks; keep the fleet on one short list.
        raise InvalidArgument(f"Ed448 keys are not accepted ({_ACCEPTED_LIST})")
    raise InvalidArgument(f"{type(key).__name__} keys are not accepted ({_ACCEPTED_LIST})")


def inspect_csr(der: bytes, *, max_bytes: int = DEFAULT_MAX_CSR_BYTES) -> CsrFacts:
    """Parse and check a DER PKCS#10 CSR; return its key and the claims it carries.

    Raises `PayloadTooLarge` if `der` is longer than `max_bytes`, and `InvalidArgument` if it
    does not parse, its self-signature does not verify (proof of possession of the key), or its
    key is not acceptable (see `check_public_key`).
    """
    if len(der) > max_bytes:
        raise PayloadTooLarge(f"CSR is {len(der)} bytes, more than the {max_bytes} allowed")
    try:
        csr = x509.load_der_x509_csr(der)
        # The key is decoded lazily; an unknown algorithm or broken key surfaces here.
        key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument(f"CSR is not valid DER PKCS#10: {exc}") from exc

    description = check_public_key(key)
    try:
        signature_ok = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        # An unsupported or malformed signature algorithm is just as unverifiable.
        raise InvalidArgument(f"CSR signature does not verify: {exc}") from exc
    if not signature_ok:
        raise InvalidArgument("CSR signature does not verify")

    # check_public_key accepted it, so it is one of the issuer-capable key types.
    assert isinstance(key, ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | rsa.RSAPublicKey)
    return CsrFacts(
        public_key=key,
        key_description=description,
        serial_number=_single_subject_value(csr, NameOID.SERIAL_NUMBER, "serialNumber"),
        common_name=_single_subject_value(csr, NameOID.COMMON_NAME, "commonName"),
        challenge_password=_challenge_password(csr),
    )


def _single_subject_value(
    csr: x509.CertificateSigningRequest, oid: x509.ObjectIdentifier, label: str
) -> str | None:
    # Two values for a name an enrollment is matched on would let a CSR claim two identities;
    # refuse rather than guess which one counts.
    values = csr.subject.get_attributes_for_oid(oid)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidArgument(f"CSR subject has {len(values)} {label} attributes; expected one")
    value = values[0].value
    if not isinstance(value, str):
        raise InvalidArgument(f"CSR subject {label} is not a string")
    return value


def _challenge_password(csr: x509.CertificateSigningRequest) -> str | None:
    try:
        attributes = csr.attributes
        attribute = attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD)
    except x509.AttributeNotFound:
        return None
    except ValueError as exc:  # attributes are parsed lazily; a malformed set shows up here
        raise InvalidArgument(f"CSR is not valid DER PKCS#10: {exc}") from exc
    # challengePassword is a DirectoryString; enrollment codes are ASCII, so UTF-8 (a superset
    # of PrintableString and IA5String) covers every honest encoding.
    try:
        return attribute.value.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument("CSR challengePassword is not a UTF-8 string") from exc
