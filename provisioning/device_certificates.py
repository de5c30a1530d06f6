"""Issued device certificates: recording them, revoking them, and recognising a device by
the certificate it presents on `coaps+tcp`.

A device has at most one VALID certificate: issuing a new one (renewal, re-enrollment)
supersedes the others. The CoAP endpoint checks the presented certificate against this table
on every request, through a short cache (`CACHE_SECONDS`), so a revocation made on another
replica takes effect within that time, and at once on the replica that made it.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from tortoise.backends.base.client import BaseDBAsyncClient
from tortoise.transactions import in_transaction

from provisioning import audit_log
from provisioning.audit_log import Action, Actor
from provisioning.certificate_authority import der_fingerprint
from provisioning.models import DeviceCertificate
from twin.access import Principal
from twin.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from twin.grouped_calls import GroupedCalls
from twin.models import Device
from twin.page_tokens import decode_numeric_page_token, page_size, split_page
from twin.registry import LifecycleState, view_of

CACHE_SECONDS = 2.0
_CACHE_LIMIT = 50_000


class CertificateState(StrEnum):
    """Where a certificate stands; EXPIRED is derived from not_after when read."""

    VALID = "valid"
    SUPERSEDED = "superseded"
    REVOKED = "revoked"
    EXPIRED = "expired"


@dataclass(frozen=True)
class CertificateView:
    """An issued certificate as operators see it."""

    serial: str
    device_id: str
    state: CertificateState
    authorization: str
    fingerprint: str
    not_before: datetime
    not_after: datetime
    issued_at: datetime
    ended_at: datetime | None
    revocation_reason: str
    pem: str


@dataclass(frozen=True)
class DeviceIdentity:
    """A device recognised by its certificate."""

    device_id: str
    serial_number: str
    certificate_serial: str
    not_after: datetime


def serial_hex(cert: x509.Certificate) -> str:
    """A certificate's serial number as the lower-case hex used in resource names."""
    return format(cert.serial_number, "x")


def _view(row: DeviceCertificate, now: datetime) -> CertificateView:
    state = CertificateState(row.state)
    if state == CertificateState.VALID and row.not_after <= now:
        state = CertificateState.EXPIRED
    return CertificateView(
        serial=row.serial,
        device_id=row.device_id,
        state=state,
        authorization=row.authorization,
        fingerprint=row.fingerprint,
        not_before=row.not_before,
        not_after=row.not_after,
        issued_at=row.issued_at,
        ended_at=row.ended_at,
        revocation_reason=row.revocation_reason,
        pem=row.pem,
    )


async def store_issued(
    conn: BaseDBAsyncClient, cert: x509.Certificate, device_id: str, authorization: str
) -> None:
    """Record a newly issued certificate inside the caller's transaction; every earlier
    valid certificate of the device becomes SUPERSEDED."""
    now = datetime.now(UTC)
    superseded = (
        await DeviceCertificate.filter(device_id=device_id, state=CertificateState.VALID.value)
        .using_db(conn)
        .values_list("fingerprint", flat=True)
    )
    await (
        DeviceCertificate.filter(device_id=device_id, state=CertificateState.VALID.value)
        .using_db(conn)
        .update(state=CertificateState.SUPERSEDED.value, ended_at=now)
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    await DeviceCertificate.create(
        using_db=conn,
        serial=serial_hex(cert),
        device_id=device_id,
        fingerprint=der_fingerprint(der),
        pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        state=CertificateState.VALID.value,
        authorization=authorization,
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        issued_at=now,
    )
    for old in superseded:
        _cache.pop(str(old), None)


async def _scoped_row(serial: str, principal: Principal) -> DeviceCertificate:
    row = await DeviceCertificate.filter(serial=serial.lower()).first()
    if row is None:
        raise NotFound(f"certificate {serial!r} does not exist")
    device = await Device.filter(id=row.device_id).first()
    if device is not None:
        principal.require_device(view_of(device).subject)
    return row


async def get_certificate(serial: str, principal: Principal) -> CertificateView:
    """One issued certificate, if its device lies within the caller's scope."""
    return _view(await _scoped_row(serial, principal), datetime.now(UTC))


async def list_certificates(
    device_id: str, requested_size: int, token: str, principal: Principal
) -> tuple[list[CertificateView], str]:
    """A page of certificates, newest first, optionally of one device."""
    size = page_size(requested_size)
    after = decode_numeric_page_token(token, device_id)
    if device_id:
        device = await Device.filter(id=device_id).first()
        if device is None:
            raise NotFound(f"device {device_id!r} does not exist")
        principal.require_device(view_of(device).subject)
    elif principal.scope.terms:
        raise PermissionDenied("a scoped token must list certificates of one device")
    query = DeviceCertificate.all().order_by("-id").limit(size + 1)
    if device_id:
        query = query.filter(device_id=device_id)
    if after is not None:
        query = query.filter(id__lt=after)
    rows = await query
    now = datetime.now(UTC)
    page, next_token = split_page(rows, size, lambda r: str(r.id), device_id)
    return [_view(r, now) for r in page], next_token


async def revoke_certificate(
    serial: str, reason: str, principal: Principal, actor: Actor
) -> CertificateView:
    """Revoke a certificate (a no-op if revoked already); the device is refused from then on."""
    reason = reason.strip()
    if not reason:
        raise InvalidArgument("reason is required")
    if len(reason) > 512:
        raise InvalidArgument("reason is longer than 512 characters")
    row = await _scoped_row(serial, principal)
    now = datetime.now(UTC)
    async with in_transaction() as conn:
        row = await DeviceCertificate.filter(id=row.id).using_db(conn).select_for_update().get()
        if row.state != CertificateState.REVOKED:
            row.state = CertificateState.REVOKED.value
            row.revocation_reason = reason
            row.ended_at = now
            await row.save(using_db=conn, update_fields=["state", "revocation_reason", "ended_at"])
            await audit_log.record(
                Action.REVOKE,
                actor,
                success=True,
                device_id=row.device_id,
                detail=f"certificates/{row.serial}: {reason}",
                conn=conn,
            )
    _cache.pop(row.fingerprint, None)
    return _view(row, now)


# fingerprint -> (monotonic expiry, identity or the error to raise)
_cache: dict[str, tuple[float, DeviceIdentity | Exception]] = {}


async def identify_device(der: bytes | None) -> DeviceIdentity:
    """The device a client certificate identifies. Unauthenticated if there is none or the
    service did not issue it; PermissionDenied if it is revoked, superseded or expired, or
    the device is decommissioned."""
    if der is None:
        raise Unauthenticated("a client certificate issued by this service is required")
    key = der_fingerprint(der)
    now = time.monotonic()
    cached = _cache.get(key)
    if cached is None or cached[0] <= now:
        try:
            result: DeviceIdentity | Exception = await _lookups.call(key)
        except (Unauthenticated, PermissionDenied) as refused:
            result = refused
        if len(_cache) >= _CACHE_LIMIT:
            _cache.clear()
        cached = (now + CACHE_SECONDS, result)
        _cache[key] = cached
    if isinstance(cached[1], Exception):
        # A fresh instance each time: re-raising one object would pile up tracebacks.
        raise type(cached[1])(*cached[1].args)
    return cached[1]


def forget_device(device_id: str) -> None:
    """Drop what the cache knows about `device_id`'s certificates (it was decommissioned)."""
    for key, (_, result) in list(_cache.items()):
        if isinstance(result, DeviceIdentity) and result.device_id == device_id:
            del _cache[key]


async def device_of_certificate(der: bytes | None) -> str:
    """The device a certificate was issued to, whatever its state ("" if none), for logs."""
    if der is None:
        return ""
    row = await DeviceCertificate.filter(fingerprint=der_fingerprint(der)).first()
    return row.device_id if row is not None else ""


async def _identify_all(keys: Sequence[str]) -> list[DeviceIdentity | Exception]:
    """What each certificate fingerprint of `keys` identifies, with two queries for all of
    them (a district reconnecting identifies a thousand devices at once)."""
    certificates = {
        row.fingerprint: row
        for row in await DeviceCertificate.filter(fingerprint__in=sorted(set(keys)))
    }
    ids = sorted({row.device_id for row in certificates.values()})
    devices = {row.id: row for row in await Device.filter(id__in=ids)} if ids else {}
    now = datetime.now(UTC)
    return [_identity(certificates.get(key), devices, now) for key in keys]


def _identity(
    row: DeviceCertificate | None, devices: dict[str, Device], now: datetime
) -> DeviceIdentity | Exception:
    if row is None:
        return Unauthenticated("the client certificate was not issued by this service")
    if row.state != CertificateState.VALID:
        return PermissionDenied(f"the client certificate is {row.state}")
    if row.not_after <= now:
        return PermissionDenied("the client certificate has expired")
    device = devices.get(row.device_id)
    if device is None or device.state == LifecycleState.DECOMMISSIONED:
        return PermissionDenied(f"device {row.device_id} is decommissioned")
    return DeviceIdentity(
        device_id=row.device_id,
        serial_number=device.serial_number,
        certificate_serial=row.serial,
        not_after=row.not_after,
    )


_lookups: GroupedCalls[str, DeviceIdentity] = GroupedCalls(
    _identify_all, max_group=500, name="certificate lookups"
)
