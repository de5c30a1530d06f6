"""The EST enrollment decisions (RFC 7030 / RFC 9148 simpleenroll and simplereenroll),
independent of the transport that carries them.

Who may obtain a certificate:
* `simple_enroll` with a one-time enrollment code in the CSR's challengePassword, for the
  serial number in the CSR's subject; or with a factory certificate (presented in the TLS
  handshake) from a trusted enrollment group whose subject serialNumber is the CSR's. Either
  way a device with that serial number must be registered; a factory-certified device that is
  not registered yet is told to come back later (5.03 with Max-Age), since an installer may
  still be on the way to register it.
* `simple_reenroll` with the device's current certificate, within the renewal window.

Every attempt is written to the audit log. Failed attempts count against the source address
and the serial number; past the limit the caller gets 4.29 with Max-Age.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from tortoise.transactions import in_transaction

from provisioning import audit_log
from provisioning.audit_log import Action, Actor
from provisioning.certificate_authority import CertificateAuthority, issue_device_certificate
from provisioning.csr_policy import DEFAULT_MAX_CSR_BYTES, CsrFacts, inspect_csr
from provisioning.device_certificates import (
    DeviceIdentity,
    device_of_certificate,
    identify_device,
    serial_hex,
    store_issued,
)
from provisioning.enrollment_groups import identify_factory_certificate
from provisioning.enrollments import redeem_code
from provisioning.policy import renewal_refusal
from provisioning.policy_store import load_policy
from provisioning.rate_limits import FailureLimiter
from twin.change_feed import FeedNotifier
from twin.errors import (
    AwaitingApproval,
    CitytwinError,
    FailedPrecondition,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    RetryLater,
    Unauthenticated,
)
from twin.models import Device
from twin.registry import LifecycleState, set_lifecycle_state

# How long a factory-certified device whose registration is missing should wait.
REGISTRATION_RETRY_SECONDS = 60


@dataclass
class Enroller:
    """Issues device certificates for EST requests; one per process."""

    ca: CertificateAuthority
    notifier: FeedNotifier
    by_source: FailureLimiter = field(default_factory=FailureLimiter)
    by_serial: FailureLimiter = field(default_factory=FailureLimiter)
    max_csr_bytes: int = DEFAULT_MAX_CSR_BYTES
    clock: Callable[[], float] = time.monotonic

    def ca_certificates(self) -> list[x509.Certificate]:
        """The chain a device needs to trust the service and its fellow devices: the issuing
        CA first, then the root (`/crts`)."""
        return [self.ca.issuing_cert, self.ca.root_cert]

    async def simple_enroll(
        self, csr_der: bytes, peer_der: bytes | None, source: str
    ) -> x509.Certificate:
        """A first certificate for a registered device (see the module docstring)."""
        actor = Actor("anonymous", source)
        return await self._attempt(
            Action.ENROLL, actor, csr_der, lambda facts: self._enroll(facts, peer_der, actor)
        )

    async def simple_reenroll(
        self, csr_der: bytes, peer_der: bytes | None, source: str
    ) -> x509.Certificate:
        """A new certificate for a device authenticated by its current one."""
        self._throttle(self.by_source, f"addr:{source}", "address")
        try:
            identity = await identify_device(peer_der)
        except CitytwinError as refused:
            device_id = await device_of_certificate(peer_der)
            await self._failed(Action.RENEW, Actor("anonymous", source), device_id, "", refused)
            raise
        actor = Actor(f"device:{identity.device_id}", source)
        return await self._attempt(
            Action.RENEW,
            actor,
            csr_der,
            lambda facts: self._renew(facts, identity, actor),
            device_id=identity.device_id,
        )

    async def _attempt(
        self,
        action: Action,
        actor: Actor,
        csr_der: bytes,
        issue: Callable[[CsrFacts], Awaitable[x509.Certificate]],
        device_id: str = "",
    ) -> x509.Certificate:
        self._throttle(self.by_source, f"addr:{actor.source}", "address")
        serial = ""
        try:
            facts = inspect_csr(csr_der, max_bytes=self.max_csr_bytes)
            serial = facts.serial_number or ""
            if not serial:
                raise InvalidArgument("the CSR's subject has no serialNumber attribute")
            self._throttle(self.by_serial, f"serial:{serial}", "serial number")
            cert = await issue(facts)
        except CitytwinError as refused:
            await self._failed(action, actor, device_id, serial, refused)
            raise
        self.notifier.wake()
        return cert

    def _throttle(self, limiter: FailureLimiter, key: str, what: str) -> None:
        wait = limiter.retry_after(key, self.clock())
        if wait:
            raise ResourceExhausted(
                f"too many failed enrollment attempts for this {what}; retry in {wait} s", wait
            )

    async def _failed(
        self, action: Action, actor: Actor, device_id: str, serial: str, refused: CitytwinError
    ) -> None:
        # Throttled and waiting callers have not failed anything (yet).
        if not isinstance(refused, RetryLater):
            now = self.clock()
            self.by_source.record_failure(f"addr:{actor.source}", now)
            if serial:
                self.by_serial.record_failure(f"serial:{serial}", now)
        if serial and not device_id:
            device = await Device.filter(serial_number=serial).first()
            device_id = device.id if device is not None else ""
        await audit_log.record(
            action,
            actor,
            success=False,
            device_id=device_id,
            serial_number=serial,
            detail=str(refused),
        )

    async def _enroll(
        self, facts: CsrFacts, peer_der: bytes | None, actor: Actor
    ) -> x509.Certificate:
        serial = facts.serial_number or ""
        factory = None
        if peer_der is not None:
            factory = await identify_factory_certificate(x509.load_der_x509_certificate(peer_der))
        if factory is None and facts.challenge_password is None:
            raise Unauthenticated(
                "enrollment needs a factory certificate from a trusted enrollment group or "
                "an enrollment code in the CSR's challengePassword"
            )
        if factory is not None and factory.serial_number != serial:
            raise PermissionDenied(
                f"the CSR's serial number {serial!r} does not match the factory "
                f"certificate's {factory.serial_number!r}"
            )
        device = await Device.filter(serial_number=serial).first()
        if device is None:
            if factory is not None:
                raise AwaitingApproval(
                    f"no device with serial number {serial!r} is registered yet; "
                    f"retry in {REGISTRATION_RETRY_SECONDS} s",
                    REGISTRATION_RETRY_SECONDS,
                )
            # Same answer as a wrong code: do not tell strangers which serials exist.
            raise PermissionDenied(f"enrollment code is not valid for serial number {serial}")
        if device.state == LifecycleState.DECOMMISSIONED:
            raise FailedPrecondition(f"device {device.id} is decommissioned")
        authorization = (
            "enrollment-code" if factory is None else f"enrollment-group:{factory.group_id}"
        )
        policy, _ = await load_policy()
        now = datetime.now(UTC)
        async with in_transaction() as conn:
            if factory is None:
                await redeem_code(conn, serial, facts.challenge_password or "", now)
            cert = issue_device_certificate(
                self.ca,
                facts,
                device_id=device.id,
                hardware_serial=serial,
                validity_days=policy.certificate_validity_days,
            )
            await store_issued(conn, cert, device.id, authorization)
            if device.state == LifecycleState.REGISTERED:
                await set_lifecycle_state(conn, device.id, LifecycleState.PROVISIONED)
            await audit_log.record(
                Action.ENROLL,
                actor,
                success=True,
                device_id=device.id,
                serial_number=serial,
                detail=f"issued certificates/{serial_hex(cert)} ({authorization}, "
                f"{facts.key_description})",
                conn=conn,
            )
        return cert

    async def _renew(
        self, facts: CsrFacts, identity: DeviceIdentity, actor: Actor
    ) -> x509.Certificate:
        # identify_device checked the certificate and the device moments ago.
        device_id, serial = identity.device_id, identity.serial_number
        if facts.serial_number != serial:
            raise PermissionDenied(
                f"the CSR's serial number {facts.serial_number!r} is not the device's {serial!r}"
            )
        policy, _ = await load_policy()
        refusal = renewal_refusal(policy, identity.not_after, datetime.now(UTC))
        if refusal is not None:
            raise PermissionDenied(refusal)
        async with in_transaction() as conn:
            cert = issue_device_certificate(
                self.ca,
                facts,
                device_id=device_id,
                hardware_serial=serial,
                validity_days=policy.certificate_validity_days,
            )
            await store_issued(conn, cert, device_id, "renewal")
            await audit_log.record(
                Action.RENEW,
                actor,
                success=True,
                device_id=device_id,
                serial_number=serial,
                detail=f"issued certificates/{serial_hex(cert)} ({facts.key_description})",
                conn=conn,
            )
        return cert
