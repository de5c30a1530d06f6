"""Enrollment groups: manufacturers' CAs trusted for zero-touch enrollment.

A device presenting, in the TLS handshake, a factory certificate issued directly by a group's
CA may enroll without a code, if a device with the serial number in that certificate's
subject is registered. A manufacturer using intermediate CAs registers the intermediate that
signs its factory certificates.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID
from tortoise.exceptions import IntegrityError
from tortoise.transactions import in_transaction

from provisioning import audit_log
from provisioning.audit_log import Action, Actor
from provisioning.certificate_authority import der_fingerprint
from provisioning.models import EnrollmentGroup
from twin.errors import AlreadyExists, InvalidArgument, NotFound
from twin.page_tokens import decode_page_token, page_size, split_page

GROUP_ID = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_MAX_PEM_BYTES = 16 * 1024
_CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class GroupView:
    """An enrollment group as callers see it."""

    id: str
    description: str
    ca_cert_pem: str
    ca_fingerprint: str
    ca_subject: str
    created_at: datetime


def _view(row: EnrollmentGroup) -> GroupView:
    return GroupView(
        id=row.id,
        description=row.description,
        ca_cert_pem=row.ca_cert_pem,
        ca_fingerprint=row.ca_fingerprint,
        ca_subject=row.ca_subject,
        created_at=row.created_at,
    )


def parse_group_ca(pem: str) -> x509.Certificate:
    """The CA certificate of a new group; InvalidArgument unless it is one PEM CA certificate."""
    if not pem.strip():
        raise InvalidArgument("enrollment_group.ca_certificate_pem is required")
    if len(pem.encode()) > _MAX_PEM_BYTES:
        raise InvalidArgument(f"ca_certificate_pem is larger than {_MAX_PEM_BYTES} bytes")
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
    except ValueError as bad:
        raise InvalidArgument(f"ca_certificate_pem is not a PEM certificate: {bad}") from None
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        constraints = None
    if constraints is None or not constraints.ca:
        raise InvalidArgument("ca_certificate_pem is not a CA certificate (basicConstraints CA)")
    if cert.not_valid_after_utc <= datetime.now(UTC):
        raise InvalidArgument("ca_certificate_pem has expired")
    return cert


async def create_group(group_id: str, description: str, pem: str, actor: Actor) -> GroupView:
    """Trust a manufacturer's CA."""
    if not GROUP_ID.fullmatch(group_id):
        raise InvalidArgument("group_id must be 1-63 lower-case letters, digits or '-'")
    if len(description) > 256:
        raise InvalidArgument("description is longer than 256 characters")
    cert = parse_group_ca(pem)
    der = cert.public_bytes(serialization.Encoding.DER)
    try:
        async with in_transaction() as conn:
            row = await EnrollmentGroup.create(
                using_db=conn,
                id=group_id,
                description=description,
                ca_cert_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
                ca_fingerprint=der_fingerprint(der),
                ca_subject=cert.subject.rfc4514_string()[:1024],
                created_at=datetime.now(UTC),
            )
            await audit_log.record(
                Action.GROUP_CREATE,
                actor,
                success=True,
                detail=f"enrollmentGroups/{group_id}: {row.ca_subject}",
                conn=conn,
            )
    except IntegrityError:
        raise AlreadyExists(
            f"enrollment group {group_id!r} or one with the same CA exists already"
        ) from None
    _groups.clear()
    return _view(row)


async def get_group(group_id: str) -> GroupView:
    """One enrollment group."""
    row = await EnrollmentGroup.filter(id=group_id).first()
    if row is None:
        raise NotFound(f"enrollment group {group_id!r} does not exist")
    return _view(row)


async def list_groups(requested_size: int, token: str) -> tuple[list[GroupView], str]:
    """A page of enrollment groups in id order."""
    size = page_size(requested_size)
    after = decode_page_token(token, "")
    rows = await EnrollmentGroup.filter(id__gt=after).order_by("id").limit(size + 1)
    page, next_token = split_page(rows, size, lambda r: r.id, "")
    return [_view(r) for r in page], next_token


async def delete_group(group_id: str, actor: Actor) -> None:
    """Stop trusting a group's CA for new enrollments."""
    async with in_transaction() as conn:
        deleted = await EnrollmentGroup.filter(id=group_id).using_db(conn).delete()
        if not deleted:
            raise NotFound(f"enrollment group {group_id!r} does not exist")
        detail = f"enrollmentGroups/{group_id}"
        await audit_log.record(Action.GROUP_DELETE, actor, success=True, detail=detail, conn=conn)
    _groups.clear()


async def all_group_ca_pems() -> list[bytes]:
    """The CA certificates of every group (for the TLS server's list of trusted client CAs)."""
    return [row.ca_cert_pem.encode() for row in await EnrollmentGroup.all()]


@dataclass(frozen=True)
class FactoryIdentity:
    """What a factory certificate vouches for."""

    group_id: str
    serial_number: str


# (monotonic expiry, [(group id, CA certificate)])
_groups: list[tuple[float, list[tuple[str, x509.Certificate]]]] = []


async def _trusted_cas() -> list[tuple[str, x509.Certificate]]:
    now = time.monotonic()
    if not _groups or _groups[0][0] <= now:
        rows = await EnrollmentGroup.all()
        cas = [(r.id, x509.load_pem_x509_certificate(r.ca_cert_pem.encode())) for r in rows]
        _groups[:] = [(now + _CACHE_SECONDS, cas)]
    return _groups[0][1]


def factory_identity(
    cert: x509.Certificate, groups: list[tuple[str, x509.Certificate]], now: datetime
) -> FactoryIdentity | None:
    """The group whose CA directly issued `cert` (valid at `now`, with a subject
    serialNumber), or None."""
    if not cert.not_valid_before_utc <= now < cert.not_valid_after_utc:
        return None
    serials = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if not serials:
        return None
    for group_id, ca in groups:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return FactoryIdentity(group_id=group_id, serial_number=str(serials[0].value))
    return None


async def identify_factory_certificate(cert: x509.Certificate) -> FactoryIdentity | None:
    """The enrollment group vouching for a factory certificate, or None."""
    return factory_identity(cert, await _trusted_cas(), datetime.now(UTC))
