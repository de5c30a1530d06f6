"""The fleet certificate authority: a two-level CA and the certificates it issues.

Pure functions with plain data: no database, no network. The root key is created here but
handed back apart from `CertificateAuthority`, so the running service only ever holds the
issuing key and the root can stay offline.

Device certificates take only the public key from a CSR. Subject, SAN and every extension come
from the arguments the enrollment layer checked, so a device cannot ask for another device's
identity or for CA powers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPublicKeyTypes,
    CertificatePublicKeyTypes,
)
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from provisioning.csr_policy import CsrFacts, check_public_key
from twin.errors import FailedPrecondition, InvalidArgument

DEVICE_URN_PREFIX = "urn:citytwin:device:"

ROOT_VALIDITY = timedelta(days=20 * 365 + 5)  # 20 years, leap days included
ISSUING_VALIDITY = timedelta(days=10 * 365 + 3)  # 10 years
MAX_LEAF_VALIDITY_DAYS = 3650
# Devices' clocks drift (and some boot without RTC until NTP answers); backdating not_before
# keeps a freshly issued certificate from being "not yet valid" on a peer a little behind.
CLOCK_SKEW = timedelta(minutes=5)

# RFC 5280 upper bounds (ub-common-name, ub-serial-number).
_MAX_NAME_CHARS = 64
# The registry owns the device id format; this only guarantees the id sits in a URN and a CN
# without escaping.
_URN_SAFE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_DNS_NAME = re.compile(
    r"(\*\.)?([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)*"
    r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)

_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}


@dataclass(frozen=True)
class CertificateAuthority:
    """The CA the service runs with: the root certificate (trust anchor), the issuing CA's
    certificate and the issuing CA's private key. The root key is deliberately absent."""

    root_cert: x509.Certificate
    issuing_cert: x509.Certificate
    issuing_key: ec.EllipticCurvePrivateKey

    def chain_der(self) -> list[bytes]:
        """The chain a client needs above a leaf, as DER: issuing CA first, then the root."""
        return [cert.public_bytes(serialization.Encoding.DER) for cert in self._chain()]

    def chain_pem(self) -> bytes:
        """The same chain as concatenated PEM (issuing CA first, then the root)."""
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self._chain())

    def _chain(self) -> list[x509.Certificate]:
        return [self.issuing_cert, self.root_cert]


def create_fleet_ca(
    name: str = "citytwin fleet",
    *,
    curve: Literal["P-256", "P-384"] = "P-256",
    now: datetime | None = None,
) -> tuple[CertificateAuthority, ec.EllipticCurvePrivateKey]:
    """Create a self-signed root CA and an issuing CA signed by it.

    The root is CA:TRUE pathlen 1 valid 20 years, the issuing CA CA:TRUE pathlen 0 valid 10
    years; both may only sign certificates and CRLs. Returns the CA (holding only the issuing
    key) and the root private key, which the caller should encrypt and keep offline.
    """
    if curve not in _CURVES:
        raise InvalidArgument(f"curve must be P-256 or P-384, not {curve!r}")
    name = name.strip()
    root_cn = f"{name} Root CA"
    issuing_cn = f"{name} Issuing CA"
    if not name or len(issuing_cn) > _MAX_NAME_CHARS:
        raise InvalidArgument(
            f"CA name must be 1 to {_MAX_NAME_CHARS - len(' Issuing CA')} characters"
        )
    start = _utc(now) - CLOCK_SKEW

    root_key = ec.generate_private_key(_CURVES[curve])
    root_name = _ca_name(name, root_cn)
    root_ski = x509.SubjectKeyIdentifier.from_public_key(root_key.public_key())
    root_cert = (
        x509.CertificateBuilder()
        .subject_name(root_name)
        .issuer_name(root_name)
        .public_key(root_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + ROOT_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(root_ski, critical=False)
        .sign(root_key, _hash_for(root_key))
    )

    issuing_key = ec.generate_private_key(_CURVES[curve])
    issuing_cert = (
        x509.CertificateBuilder()
        .subject_name(_ca_name(name, issuing_cn))
        .issuer_name(root_name)
        .public_key(issuing_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + ISSUING_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(issuing_key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(root_ski),
            critical=False,
        )
        .sign(root_key, _hash_for(root_key))
    )
    ca = CertificateAuthority(
        root_cert=root_cert, issuing_cert=issuing_cert, issuing_key=issuing_key
    )
    return ca, root_key


def encrypt_private_key(key: ec.EllipticCurvePrivateKey, passphrase: bytes) -> bytes:
    """Serialise a CA key as passphrase-encrypted PKCS#8 PEM. Refuses an empty passphrase."""
    _check_passphrase(passphrase)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )


def decrypt_private_key(pem: bytes, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    """Load a CA key written by `encrypt_private_key`.

    Raises `InvalidArgument` if the passphrase is empty or wrong, the PEM is damaged, or the
    key is not an EC key.
    """
    _check_passphrase(passphrase)
    return _load_ca_key(pem, passphrase)


def load_ca(
    root_pem: bytes,
    issuing_pem: bytes,
    issuing_key_pem: bytes,
    passphrase: bytes | None,
    *,
    now: datetime | None = None,
) -> CertificateAuthority:
    """Build a `CertificateAuthority` from PEM files (for `citytwin ca import`).

    `passphrase` is None for an unencrypted key. Raises `InvalidArgument` with the reason if a
    file does not parse, either certificate is not a CA, the issuing certificate is not signed
    by the root, the key does not belong to the issuing certificate, or either certificate is
    not valid at `now` (default: the current time).
    """
    root = _load_cert(root_pem, "root")
    issuing = _load_cert(issuing_pem, "issuing")
    for cert, label in ((root, "root"), (issuing, "issuing")):
        _check_is_ca(cert, label)
        _check_valid_at(cert, label, _utc(now))
    try:
        issuing.verify_directly_issued_by(root)
    except (ValueError, TypeError, InvalidSignature) as exc:
        detail = str(exc) or "the signature does not verify"
        raise InvalidArgument(
            f"issuing CA certificate is not signed by the root: {detail}"
        ) from exc

    if passphrase is not None:
        _check_passphrase(passphrase)
    key = _load_ca_key(issuing_key_pem, passphrase)
    cert_key = issuing.public_key()
    if not isinstance(cert_key, ec.EllipticCurvePublicKey) or _spki(cert_key) != _spki(
        key.public_key()
    ):
        raise InvalidArgument("issuing CA key does not match the issuing CA certificate")
    if key.curve.name not in (ec.SECP256R1.name, ec.SECP384R1.name):
        raise InvalidArgument(f"issuing CA key is on {key.curve.name}; use P-256 or P-384")
    return CertificateAuthority(root_cert=root, issuing_cert=issuing, issuing_key=key)


def issue_device_certificate(
    ca: CertificateAuthority,
    csr: CsrFacts,
    *,
    device_id: str,
    hardware_serial: str,
    validity_days: int = 365,
    now: datetime | None = None,
) -> x509.Certificate:
    """Issue a TLS client certificate for a device, for the key in a checked CSR.

    Subject is CN=`device_id`, serialNumber=`hardware_serial`; the SAN carries the URI
    `urn:citytwin:device:{device_id}`, which `device_id_of` reads back. Only the CSR's key is
    used; its subject and requested extensions are ignored. The certificate never outlives the
    issuing CA (not_after is capped at the CA's).
    """
    if not _URN_SAFE.fullmatch(device_id) or len(device_id) > _MAX_NAME_CHARS:
        raise InvalidArgument(
            f"device id {device_id!r} must be 1 to {_MAX_NAME_CHARS} of A-Z a-z 0-9 . _ -"
        )
    if not hardware_serial or len(hardware_serial) > _MAX_NAME_CHARS:
        raise InvalidArgument(f"hardware serial must be 1 to {_MAX_NAME_CHARS} characters")
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, device_id),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, hardware_serial),
        ]
    )
    builder = _leaf_builder(ca, csr.public_key, subject, validity_days, now)
    builder = (
        builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(DEVICE_URN_PREFIX + device_id)]
            ),
            critical=False,
        )
        .add_extension(_leaf_key_usage(key_encipherment=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    )
    return builder.sign(ca.issuing_key, _hash_for(ca.issuing_key))


def issue_server_certificate(
    ca: CertificateAuthority,
    public_key: CertificateIssuerPublicKeyTypes,
    *,
    dns_names: list[str],
    ip_addresses: list[str],
    validity_days: int = 365,
    now: datetime | None = None,
) -> x509.Certificate:
    """Issue a TLS server certificate for the service's own CoAP-over-TLS and gRPC endpoints.

    The SAN lists `dns_names` and `ip_addresses` (at least one entry in all); the subject CN is
    the first of them, for tools that still display it (omitted if longer than 64 characters).
    EKU serverAuth; key usage digitalSignature, plus keyEncipherment for RSA keys (TLS 1.2 RSA
    key transport).
    """
    check_public_key(public_key)
    names: list[x509.GeneralName] = []
    for dns_name in dns_names:
        if not _DNS_NAME.fullmatch(dns_name) or len(dns_name) > 253:
            raise InvalidArgument(f"{dns_name!r} is not a valid DNS name")
        names.append(x509.DNSName(dns_name.lower()))
    for text in ip_addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(text)))
        except ValueError as exc:
            raise InvalidArgument(f"{text!r} is not a valid IP address") from exc
    if not names:
        raise InvalidArgument("a server certificate needs at least one DNS name or IP address")
    first = dns_names[0].lower() if dns_names else str(ipaddress.ip_address(ip_addresses[0]))
    # A name too long for a CN (ub-common-name) goes in the SAN only; RFC 5280 then wants an
    # empty subject and a critical SAN.
    fits = len(first) <= _MAX_NAME_CHARS
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, first)] if fits else [])
    builder = _leaf_builder(ca, public_key, subject, validity_days, now)
    builder = (
        builder.add_extension(x509.SubjectAlternativeName(names), critical=not fits)
        .add_extension(
            _leaf_key_usage(key_encipherment=isinstance(public_key, rsa.RSAPublicKey)),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
    )
    return builder.sign(ca.issuing_key, _hash_for(ca.issuing_key))


def device_id_of(cert: x509.Certificate) -> str | None:
    """The device id in a certificate's `urn:citytwin:device:` SAN URI, or None.

    None also when the certificate carries more than one such URI: a certificate naming two
    devices identifies none of them.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (x509.ExtensionNotFound, ValueError):
        return None
    ids = [
        uri[len(DEVICE_URN_PREFIX) :]
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier)
        if uri.startswith(DEVICE_URN_PREFIX)
    ]
    if len(ids) != 1 or not ids[0]:
        return None
    return ids[0]


def der_fingerprint(der: bytes) -> str:
    """SHA-256 of DER bytes (a certificate), lower-case hex."""
    return hashlib.sha256(der).hexdigest()


def certs_only_pkcs7(certs: list[x509.Certificate]) -> bytes:
    """DER certs-only PKCS#7 (EST's application/pkcs7-mime; smime-type=certs-only).

    The certificates form a DER SET OF, so their order is not preserved; EST clients find the
    leaf by its key, not by position.
    """
    if not certs:
        raise InvalidArgument("a certs-only PKCS#7 needs at least one certificate")
    return pkcs7.serialize_certificates(certs, serialization.Encoding.DER)


def _leaf_builder(
    ca: CertificateAuthority,
    public_key: CertificateIssuerPublicKeyTypes,
    subject: x509.Name,
    validity_days: int,
    now: datetime | None,
) -> x509.CertificateBuilder:
    # The parts every end-entity certificate shares: validity, serial, CA:FALSE, key ids.
    if not 1 <= validity_days <= MAX_LEAF_VALIDITY_DAYS:
        raise InvalidArgument(
            f"validity_days must be between 1 and {MAX_LEAF_VALIDITY_DAYS}, not {validity_days}"
        )
    current = _utc(now)
    ca_end = ca.issuing_cert.not_valid_after_utc
    if current >= ca_end:
        raise FailedPrecondition(f"the issuing CA certificate expired at {ca_end.isoformat()}")
    start = current - CLOCK_SKEW
    end = min(current + timedelta(days=validity_days), ca_end)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.issuing_cert.subject)
        .public_key(public_key)
        # 159 random bits (RFC 5280 allows 20 octets; CA/B Forum asks for >= 64 random bits).
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_id(ca.issuing_cert), critical=False)
    )


def _authority_key_id(issuer: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # Reuse the issuer's own SKI so chain builders match on it; an imported CA may lack one.
    try:
        ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            _issuer_public_key(issuer.public_key())
        )
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def _issuer_public_key(key: CertificatePublicKeyTypes) -> CertificateIssuerPublicKeyTypes:
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise InvalidArgument("the issuing CA certificate does not hold an EC key")
    return key


def _ca_name(organization: str, common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage(*, key_encipherment: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def _hash_for(key: ec.EllipticCurvePrivateKey) -> hashes.SHA256 | hashes.SHA384:
    # Match the hash strength to the curve (RFC 5480 section 4).
    if key.curve.name == ec.SECP384R1.name:
        return hashes.SHA384()
    return hashes.SHA256()


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise InvalidArgument("now must be timezone-aware")
    return now.astimezone(UTC)


def _check_passphrase(passphrase: bytes) -> None:
    if not passphrase:
        raise InvalidArgument("CA key passphrase must not be empty")


def _load_ca_key(pem: bytes, passphrase: bytes | None) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=passphrase)
    except TypeError as exc:
        # cryptography says TypeError when a password is given for a plain key or missing for
        # an encrypted one.
        if passphrase is None:
            raise InvalidArgument("CA key is encrypted; a passphrase is needed") from exc
        raise InvalidArgument("CA key is not encrypted; pass no passphrase") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise InvalidArgument("CA key passphrase is wrong or the key is damaged") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise InvalidArgument("CA key must be an EC private key (P-256 or P-384)")
    return key


def _load_cert(pem: bytes, label: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise InvalidArgument(f"{label} CA certificate is not valid PEM: {exc}") from exc


def _check_is_ca(cert: x509.Certificate, label: str) -> None:
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    except ValueError as exc:
        raise InvalidArgument(f"{label} CA certificate has malformed extensions: {exc}") from exc
    if constraints is None or not constraints.ca:
        raise InvalidArgument(f"{label} certificate is not a CA certificate (no CA:TRUE)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # RFC 5280 lets a CA omit KeyUsage; then nothing restricts it
    if not usage.key_cert_sign:
        raise InvalidArgument(f"{label} CA certificate may not sign certificates (no keyCertSign)")


def _check_valid_at(cert: x509.Certificate, label: str, now: datetime) -> None:
    if now < cert.not_valid_before_utc:
        raise InvalidArgument(
            f"{label} CA certificate is not valid before {cert.not_valid_before_utc.isoformat()}"
        )
    if now > cert.not_valid_after_utc:
        raise InvalidArgument(
            f"{label} CA certificate expired at {cert.not_valid_after_utc.isoformat()}"
        )


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
