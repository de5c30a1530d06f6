"""The fleet CA's home: one row in the database, shared by every replica.

The first replica to start creates the CA; any other finds it (the check and the insert run
under one lock, so two replicas starting together never make two CAs). Private keys are
stored encrypted with a passphrase from `CITYTWIN_CA_PASSPHRASE`, or else from a key file
under the data directory, created with mode 0600 on first start. Replicas sharing one
database must share the passphrase too.
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from provisioning.certificate_authority import (
    CertificateAuthority,
    create_fleet_ca,
    decrypt_private_key,
    encrypt_private_key,
    load_ca,
)
from provisioning.models import FleetCa
from twin.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound

PASSPHRASE_FILE = "ca-passphrase"
_CA_LOCK_KEY = 0x63612D31  # "ca-1"


def ca_passphrase(home: Path, environment_value: str | None) -> bytes:
    """The passphrase protecting the CA keys: the environment's, or the data directory's
    key file (created, 0600, if missing)."""
    if environment_value:
        return environment_value.encode()
    path = home / PASSPHRASE_FILE
    if not path.exists():
        home.mkdir(parents=True, exist_ok=True)
        # O_EXCL: two processes racing to create it cannot both write a different secret.
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass
        else:
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(32))
    return path.read_text().strip().encode()


@dataclass(frozen=True)
class CaSummary:
    """What operators see of the CA (no keys)."""

    source: str
    created_at: datetime
    root_subject: str
    root_sha256: str
    issuing_subject: str
    issuing_sha256: str
    issuing_not_after: datetime
    chain_pem: bytes


def _fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":")


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


async def _lock(conn: BaseDBAsyncClient) -> None:
    # SQLite has one writer, so its transaction alone serialises the check and the insert.
    if conn.capabilities.dialect == "postgres":
        await conn.execute_query("SELECT pg_advisory_xact_lock($1)", [_CA_LOCK_KEY])


async def _store(
    conn: BaseDBAsyncClient,
    ca: CertificateAuthority,
    root_key: ec.EllipticCurvePrivateKey | None,
    source: str,
    passphrase: bytes,
) -> None:
    await FleetCa.create(
        using_db=conn,
        id=1,
        root_cert_pem=_pem(ca.root_cert),
        issuing_cert_pem=_pem(ca.issuing_cert),
        issuing_key_pem=encrypt_private_key(ca.issuing_key, passphrase).decode(),
        root_key_pem=encrypt_private_key(root_key, passphrase).decode() if root_key else None,
        source=source,
        created_at=datetime.now(UTC),
    )


async def ensure_ca(passphrase: bytes) -> CertificateAuthority:
    """The fleet CA, created on first start of the first replica."""
    async with in_transaction() as conn:
        await _lock(conn)
        row = await FleetCa.get_or_none(id=1, using_db=conn)
        if row is None:
            ca, root_key = create_fleet_ca()
            await _store(conn, ca, root_key, "generated", passphrase)
            return ca
    return _ca_of(row, passphrase)


def _ca_of(row: FleetCa, passphrase: bytes) -> CertificateAuthority:
    try:
        key = decrypt_private_key(row.issuing_key_pem.encode(), passphrase)
    except InvalidArgument as error:
        raise FailedPrecondition(
            f"cannot open the fleet CA key ({error}); every replica needs the same "
            "CITYTWIN_CA_PASSPHRASE (or ca-passphrase file)"
        ) from None
    return CertificateAuthority(
        root_cert=x509.load_pem_x509_certificate(row.root_cert_pem.encode()),
        issuing_cert=x509.load_pem_x509_certificate(row.issuing_cert_pem.encode()),
        issuing_key=key,
    )


async def import_ca(
    root_pem: bytes,
    issuing_pem: bytes,
    issuing_key_pem: bytes,
    key_passphrase: bytes | None,
    passphrase: bytes,
) -> CertificateAuthority:
    """Adopt an operator's CA (root certificate, issuing certificate and its key) before the
    service first starts; AlreadyExists if a CA is in place (its devices' certificates would
    all stop verifying)."""
    ca = load_ca(root_pem, issuing_pem, issuing_key_pem, key_passphrase)
    async with in_transaction() as conn:
        await _lock(conn)
        if await FleetCa.exists(id=1, using_db=conn):
            raise AlreadyExists(
                "a fleet CA exists already; importing another would orphan every device "
                "certificate it issued"
            )
        await _store(conn, ca, None, "imported", passphrase)
    return ca


async def ca_summary() -> CaSummary:
    """The CA's certificates and fingerprints; NotFound before the first start."""
    row = await FleetCa.get_or_none(id=1)
    if row is None:
        raise NotFound("no fleet CA yet: it is created when the service first starts")
    root = x509.load_pem_x509_certificate(row.root_cert_pem.encode())
    issuing = x509.load_pem_x509_certificate(row.issuing_cert_pem.encode())
    return CaSummary(
        source=row.source,
        created_at=row.created_at,
        root_subject=root.subject.rfc4514_string(),
        root_sha256=_fingerprint(root),
        issuing_subject=issuing.subject.rfc4514_string(),
        issuing_sha256=_fingerprint(issuing),
        issuing_not_after=issuing.not_valid_after_utc,
        chain_pem=(row.issuing_cert_pem + row.root_cert_pem).encode(),
    )
