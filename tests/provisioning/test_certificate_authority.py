"""The fleet CA: creation, key storage, import, device and server certificates, PKCS#7."""

from __future__ import annotations

import ipaddress
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from provisioning.certificate_authority import (
    CertificateAuthority,
    certs_only_pkcs7,
    create_fleet_ca,
    decrypt_private_key,
    device_id_of,
    encrypt_private_key,
    issue_device_certificate,
    issue_server_certificate,
    load_ca,
)
from provisioning.csr_policy import CsrFacts, inspect_csr
from tests.provisioning.test_csr_policy import make_csr
from twin.errors import FailedPrecondition, InvalidArgument

NOW = datetime(2030, 6, 1, 12, 0, tzinfo=UTC)
PEM = serialization.Encoding.PEM


@pytest.fixture(scope="module")
def fleet() -> tuple[CertificateAuthority, ec.EllipticCurvePrivateKey]:
    return create_fleet_ca(now=NOW)


@pytest.fixture(scope="module")
def ca(fleet: tuple[CertificateAuthority, ec.EllipticCurvePrivateKey]) -> CertificateAuthority:
    return fleet[0]


@pytest.fixture(scope="module")
def device_csr() -> CsrFacts:
    return inspect_csr(make_csr(ec.generate_private_key(ec.SECP256R1())))


def ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def key_usage(cert: x509.Certificate) -> x509.KeyUsage:
    value = ext(cert, x509.KeyUsage).value
    assert isinstance(value, x509.KeyUsage)
    return value


# --- creation -------------------------------------------------------------------------------


def test_root_is_a_self_signed_ca_with_pathlen_1(ca: CertificateAuthority) -> None:
    root = ca.root_cert
    root.verify_directly_issued_by(root)
    constraints = ext(root, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=True, path_length=1)
    usage = ext(root, x509.KeyUsage)
    assert usage.critical
    assert key_usage(root).key_cert_sign and key_usage(root).crl_sign
    assert not key_usage(root).digital_signature
    assert root.not_valid_before_utc == NOW - timedelta(minutes=5)
    lifetime = root.not_valid_after_utc - root.not_valid_before_utc
    assert timedelta(days=20 * 365) <= lifetime <= timedelta(days=20 * 366)
    ext(root, x509.SubjectKeyIdentifier)


def test_issuing_ca_is_signed_by_root_with_pathlen_0(ca: CertificateAuthority) -> None:
    issuing = ca.issuing_cert
    issuing.verify_directly_issued_by(ca.root_cert)
    assert issuing.issuer == ca.root_cert.subject
    assert ext(issuing, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=True, path_length=0
    )
    assert ext(issuing, x509.KeyUsage).critical
    assert key_usage(issuing).key_cert_sign
    lifetime = issuing.not_valid_after_utc - issuing.not_valid_before_utc
    assert timedelta(days=10 * 365) <= lifetime <= timedelta(days=10 * 366)
    root_ski = ext(ca.root_cert, x509.SubjectKeyIdentifier).value
    aki = ext(issuing, x509.AuthorityKeyIdentifier).value
    assert isinstance(root_ski, x509.SubjectKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == root_ski.digest
    assert isinstance(issuing.signature_hash_algorithm, hashes.SHA256)


def test_root_key_is_returned_apart(
    fleet: tuple[CertificateAuthority, ec.EllipticCurvePrivateKey],
) -> None:
    ca, root_key = fleet
    assert root_key.public_key() == ca.root_cert.public_key()
    assert ca.issuing_key.public_key() == ca.issuing_cert.public_key()
    assert root_key.public_key() != ca.issuing_key.public_key()


def test_p384_ca_uses_sha384() -> None:
    ca, root_key = create_fleet_ca("north", curve="P-384")
    assert root_key.curve.name == "secp384r1"
    assert ca.issuing_key.curve.name == "secp384r1"
    assert isinstance(ca.root_cert.signature_hash_algorithm, hashes.SHA384)
    assert isinstance(ca.issuing_cert.signature_hash_algorithm, hashes.SHA384)
    cn = ca.root_cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert cn == "north Root CA"


@pytest.mark.parametrize("name", ["", "   ", "x" * 60])
def test_bad_ca_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="CA name"):
        create_fleet_ca(name)


def test_chain_order_and_encodings(ca: CertificateAuthority) -> None:
    der = ca.chain_der()
    assert [x509.load_der_x509_certificate(d) for d in der] == [ca.issuing_cert, ca.root_cert]
    assert x509.load_pem_x509_certificates(ca.chain_pem()) == [ca.issuing_cert, ca.root_cert]


# --- device certificates --------------------------------------------------------------------


def test_device_certificate_has_exactly_the_required_fields(
    ca: CertificateAuthority, device_csr: CsrFacts
) -> None:
    cert = issue_device_certificate(
        ca, device_csr, device_id="lamp-0001", hardware_serial="HW-123", now=NOW
    )
    cert.verify_directly_issued_by(ca.issuing_cert)
    assert cert.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, "lamp-0001"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, "HW-123"),
        ]
    )
    assert cert.issuer == ca.issuing_cert.subject
    assert cert.public_key() == device_csr.public_key
    assert {e.oid for e in cert.extensions} == {
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    assert ext(cert, x509.SubjectAlternativeName).value == x509.SubjectAlternativeName(
        [x509.UniformResourceIdentifier("urn:citytwin:device:lamp-0001")]
    )
    usage = ext(cert, x509.KeyUsage)
    assert usage.critical
    assert usage.value == x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.CLIENT_AUTH]
    )
    constraints = ext(cert, x509.BasicConstraints)
    assert constraints.critical
    assert constraints.value == x509.BasicConstraints(ca=False, path_length=None)
    assert ext(cert, x509.SubjectKeyIdentifier).value == (
        x509.SubjectKeyIdentifier.from_public_key(device_csr.public_key)
    )
    issuing_ski = ext(ca.issuing_cert, x509.SubjectKeyIdentifier).value
    aki = ext(cert, x509.AuthorityKeyIdentifier).value
    assert isinstance(issuing_ski, x509.SubjectKeyIdentifier)
    assert isinstance(aki, x509.AuthorityKeyIdentifier)
    assert aki.key_identifier == issuing_ski.digest
    assert cert.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)
    assert device_id_of(cert) == "lamp-0001"


def test_malicious_csr_subject_and_extensions_are_ignored(ca: CertificateAuthority) -> None:
    der = make_csr(
        ec.generate_private_key(ec.SECP256R1()),
        common_name="other-device",
        serial_numbers=("HW-OTHER",),
        extensions=(
            x509.BasicConstraints(ca=True, path_length=None),
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:citytwin:device:other-device")]
            ),
        ),
    )
    cert = issue_device_certificate(
        ca, inspect_csr(der), device_id="lamp-0001", hardware_serial="HW-123", now=NOW
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "lamp-0001"
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "HW-123"
    assert ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    assert device_id_of(cert) == "lamp-0001"


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP384R1()),
        ed25519.Ed25519PrivateKey.generate(),
        rsa.generate_private_key(65537, 2048),
    ],
    ids=["p384", "ed25519", "rsa2048"],
)
def test_every_accepted_key_type_gets_a_certificate(
    ca: CertificateAuthority, key: CertificateIssuerPrivateKeyTypes
) -> None:
    cert = issue_device_certificate(
        ca, inspect_csr(make_csr(key)), device_id="sensor-7", hardware_serial="S7", now=NOW
    )
    cert.verify_directly_issued_by(ca.issuing_cert)
    assert cert.public_key() == key.public_key()
    assert not key_usage(cert).key_encipherment


def test_serials_are_random_positive_and_long(
    ca: CertificateAuthority, device_csr: CsrFacts
) -> None:
    serials = [
        issue_device_certificate(
            ca, device_csr, device_id="lamp-0001", hardware_serial="HW-123", now=NOW
        ).serial_number
        for _ in range(20)
    ]
    assert all(s > 0 for s in serials)
    assert len(set(serials)) == len(serials)
    assert all(s.bit_length() <= 159 for s in serials)  # fits RFC 5280's 20 octets
    assert sum(s.bit_length() > 120 for s in serials) >= 19


@pytest.mark.parametrize("days", [0, -1, 3651])
def test_validity_out_of_range_is_refused(
    ca: CertificateAuthority, device_csr: CsrFacts, days: int
) -> None:
    with pytest.raises(InvalidArgument, match="validity_days must be between 1 and 3650"):
        issue_device_certificate(
            ca, device_csr, device_id="lamp-1", hardware_serial="HW", validity_days=days, now=NOW
        )


def test_validity_bounds_are_accepted(ca: CertificateAuthority, device_csr: CsrFacts) -> None:
    for days in (1, 3650):
        cert = issue_device_certificate(
            ca, device_csr, device_id="lamp-1", hardware_serial="HW", validity_days=days, now=NOW
        )
        assert cert.not_valid_after_utc == NOW + timedelta(days=days)


def test_device_certificate_never_outlives_the_issuing_ca(
    ca: CertificateAuthority, device_csr: CsrFacts
) -> None:
    late = ca.issuing_cert.not_valid_after_utc - timedelta(days=10)
    cert = issue_device_certificate(
        ca, device_csr, device_id="lamp-1", hardware_serial="HW", validity_days=365, now=late
    )
    assert cert.not_valid_after_utc == ca.issuing_cert.not_valid_after_utc


def test_expired_issuing_ca_cannot_issue(ca: CertificateAuthority, device_csr: CsrFacts) -> None:
    after = ca.issuing_cert.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(FailedPrecondition, match="expired"):
        issue_device_certificate(
            ca, device_csr, device_id="lamp-1", hardware_serial="HW", now=after
        )


@pytest.mark.parametrize(
    ("device_id", "serial"),
    [("", "HW"), ("lamp 1", "HW"), ("lamp:1", "HW"), ("a" * 65, "HW"), ("lamp-1", "")],
)
def test_bad_identities_are_refused(
    ca: CertificateAuthority, device_csr: CsrFacts, device_id: str, serial: str
) -> None:
    with pytest.raises(InvalidArgument):
        issue_device_certificate(ca, device_csr, device_id=device_id, hardware_serial=serial)


def test_naive_now_is_refused(ca: CertificateAuthority, device_csr: CsrFacts) -> None:
    with pytest.raises(InvalidArgument, match="timezone-aware"):
        issue_device_certificate(
            ca, device_csr, device_id="lamp-1", hardware_serial="HW", now=datetime(2030, 1, 1)
        )


# --- server certificates --------------------------------------------------------------------


def test_server_certificate_san_and_usage(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = issue_server_certificate(
        ca,
        key.public_key(),
        dns_names=["Twin.City.Example", "localhost"],
        ip_addresses=["127.0.0.1", "::1"],
        now=NOW,
    )
    cert.verify_directly_issued_by(ca.issuing_cert)
    san = ext(cert, x509.SubjectAlternativeName).value
    assert isinstance(san, x509.SubjectAlternativeName)
    assert san.get_values_for_type(x509.DNSName) == ["twin.city.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("::1"),
    ]
    assert ext(cert, x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH]
    )
    assert key_usage(cert).digital_signature
    assert not key_usage(cert).key_encipherment
    assert ext(cert, x509.BasicConstraints).value == x509.BasicConstraints(
        ca=False, path_length=None
    )
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "twin.city.example"
    )
    assert device_id_of(cert) is None


def test_rsa_server_certificate_allows_key_encipherment(ca: CertificateAuthority) -> None:
    key = rsa.generate_private_key(65537, 2048)
    cert = issue_server_certificate(
        ca, key.public_key(), dns_names=[], ip_addresses=["10.0.0.5"], now=NOW
    )
    assert key_usage(cert).digital_signature and key_usage(cert).key_encipherment
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "10.0.0.5"


@pytest.mark.parametrize(
    ("dns_names", "ips", "message"),
    [
        ([], [], "at least one"),
        (["bad name"], [], "not a valid DNS name"),
        (["-x.example"], [], "not a valid DNS name"),
        ([], ["300.1.1.1"], "not a valid IP address"),
    ],
)
def test_bad_server_names_are_refused(
    ca: CertificateAuthority, dns_names: list[str], ips: list[str], message: str
) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(InvalidArgument, match=message):
        issue_server_certificate(ca, key.public_key(), dns_names=dns_names, ip_addresses=ips)


def test_server_key_must_be_acceptable(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(InvalidArgument, match="secp521r1"):
        issue_server_certificate(ca, key.public_key(), dns_names=["a.example"], ip_addresses=[])


# --- device_id_of ---------------------------------------------------------------------------


def test_device_id_of_refuses_ambiguous_or_absent_uris(ca: CertificateAuthority) -> None:
    assert device_id_of(ca.root_cert) is None
    key = ec.generate_private_key(ec.SECP256R1())
    two = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.issuing_cert.subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier("urn:citytwin:device:a"),
                    x509.UniformResourceIdentifier("urn:citytwin:device:b"),
                ]
            ),
            critical=True,
        )
        .sign(ca.issuing_key, hashes.SHA256())
    )
    assert device_id_of(two) is None


# --- key storage and import -----------------------------------------------------------------


def test_key_encryption_round_trip(
    fleet: tuple[CertificateAuthority, ec.EllipticCurvePrivateKey],
) -> None:
    _, root_key = fleet
    pem = encrypt_private_key(root_key, b"correct horse")
    assert b"ENCRYPTED PRIVATE KEY" in pem
    loaded = decrypt_private_key(pem, b"correct horse")
    assert loaded.private_numbers() == root_key.private_numbers()


def test_wrong_passphrase_and_damaged_key_are_refused(
    fleet: tuple[CertificateAuthority, ec.EllipticCurvePrivateKey],
) -> None:
    pem = encrypt_private_key(fleet[1], b"correct horse")
    message = "CA key passphrase is wrong or the key is damaged"
    with pytest.raises(InvalidArgument, match=message):
        decrypt_private_key(pem, b"wrong")
    with pytest.raises(InvalidArgument, match=message):
        decrypt_private_key(b"garbage", b"correct horse")


def test_empty_passphrase_is_refused(
    fleet: tuple[CertificateAuthority, ec.EllipticCurvePrivateKey],
) -> None:
    with pytest.raises(InvalidArgument, match="must not be empty"):
        encrypt_private_key(fleet[1], b"")
    with pytest.raises(InvalidArgument, match="must not be empty"):
        decrypt_private_key(encrypt_private_key(fleet[1], b"pw"), b"")


def pem_files(ca: CertificateAuthority, passphrase: bytes | None) -> tuple[bytes, bytes, bytes]:
    if passphrase is None:
        key_pem = ca.issuing_key.private_bytes(
            PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    else:
        key_pem = encrypt_private_key(ca.issuing_key, passphrase)
    return ca.root_cert.public_bytes(PEM), ca.issuing_cert.public_bytes(PEM), key_pem


@pytest.mark.parametrize("passphrase", [b"secret", None])
def test_load_ca_round_trip(ca: CertificateAuthority, passphrase: bytes | None) -> None:
    loaded = load_ca(*pem_files(ca, passphrase), passphrase, now=NOW)
    assert loaded.root_cert == ca.root_cert
    assert loaded.issuing_cert == ca.issuing_cert
    assert loaded.issuing_key.private_numbers() == ca.issuing_key.private_numbers()


def test_load_ca_passphrase_mismatch(ca: CertificateAuthority) -> None:
    with pytest.raises(InvalidArgument, match="passphrase is needed"):
        load_ca(*pem_files(ca, b"secret"), None, now=NOW)
    with pytest.raises(InvalidArgument, match="not encrypted"):
        load_ca(*pem_files(ca, None), b"secret", now=NOW)
    with pytest.raises(InvalidArgument, match="passphrase is wrong"):
        load_ca(*pem_files(ca, b"secret"), b"other", now=NOW)


def test_load_ca_refuses_mismatched_key(ca: CertificateAuthority) -> None:
    root_pem, issuing_pem, _ = pem_files(ca, None)
    other = encrypt_private_key(ec.generate_private_key(ec.SECP256R1()), b"pw")
    with pytest.raises(InvalidArgument, match="key does not match"):
        load_ca(root_pem, issuing_pem, other, b"pw", now=NOW)


def test_load_ca_refuses_issuing_cert_from_another_root(ca: CertificateAuthority) -> None:
    other, _ = create_fleet_ca(now=NOW)  # same names, different keys
    _, issuing_pem, key_pem = pem_files(other, b"pw")
    with pytest.raises(InvalidArgument, match="not signed by the root"):
        load_ca(ca.root_cert.public_bytes(PEM), issuing_pem, key_pem, b"pw", now=NOW)


def test_load_ca_refuses_a_leaf_as_issuing_ca(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = issue_server_certificate(
        ca, key.public_key(), dns_names=["a.example"], ip_addresses=[], now=NOW
    )
    with pytest.raises(InvalidArgument, match="issuing certificate is not a CA"):
        load_ca(
            ca.root_cert.public_bytes(PEM),
            leaf.public_bytes(PEM),
            encrypt_private_key(key, b"pw"),
            b"pw",
            now=NOW,
        )


def test_load_ca_refuses_expired_and_not_yet_valid(ca: CertificateAuthority) -> None:
    files = pem_files(ca, b"pw")
    with pytest.raises(InvalidArgument, match="issuing CA certificate expired"):
        load_ca(*files, b"pw", now=NOW + timedelta(days=11 * 365))
    with pytest.raises(InvalidArgument, match="not valid before"):
        load_ca(*files, b"pw", now=NOW - timedelta(days=1))


def test_load_ca_refuses_garbage(ca: CertificateAuthority) -> None:
    _, issuing_pem, key_pem = pem_files(ca, b"pw")
    with pytest.raises(InvalidArgument, match="root CA certificate is not valid PEM"):
        load_ca(b"nope", issuing_pem, key_pem, b"pw", now=NOW)


# --- PKCS#7 ---------------------------------------------------------------------------------


def test_certs_only_pkcs7_round_trip(ca: CertificateAuthority, device_csr: CsrFacts) -> None:
    cert = issue_device_certificate(
        ca, device_csr, device_id="lamp-0001", hardware_serial="HW-123", now=NOW
    )
    for certs in ([cert], [ca.issuing_cert, ca.root_cert]):
        parsed = pkcs7.load_der_pkcs7_certificates(certs_only_pkcs7(certs))
        # PKCS#7 holds a SET OF certificates: DER sorts it, so only membership is kept.
        assert set(parsed) == set(certs)
        assert len(parsed) == len(certs)
    with pytest.raises(InvalidArgument):
        certs_only_pkcs7([])
