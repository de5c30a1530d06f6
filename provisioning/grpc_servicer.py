"""gRPC ProvisioningService: decode, call the provisioning stores, encode."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from citytwin.v1 import provisioning_pb2, provisioning_pb2_grpc
from provisioning import audit_log, device_certificates, enrollment_groups, enrollments
from provisioning.audit_log import Actor, AuditEntry
from provisioning.device_certificates import CertificateState, CertificateView
from provisioning.enrollment_groups import GroupView
from provisioning.enrollments import EnrollmentState, EnrollmentView
from provisioning.policy import Policy
from provisioning.policy_store import load_policy, update_policy
from twin.change_feed import FeedNotifier
from twin.errors import InvalidArgument, PermissionDenied
from twin.grpc_api.convert import (
    device_from_proto,
    device_id_from_name,
    device_to_proto,
    timestamp,
)
from twin.grpc_api.interceptor import current_principal

_ENROLLMENT_STATES = {
    EnrollmentState.PENDING: provisioning_pb2.PENDING,
    EnrollmentState.USED: provisioning_pb2.USED,
    EnrollmentState.CANCELLED: provisioning_pb2.CANCELLED,
    EnrollmentState.EXPIRED: provisioning_pb2.EXPIRED,
}
_ENROLLMENT_STATE_OF = {v: k for k, v in _ENROLLMENT_STATES.items()}
_CERTIFICATE_STATES = {
    CertificateState.VALID: provisioning_pb2.VALID,
    CertificateState.SUPERSEDED: provisioning_pb2.SUPERSEDED,
    CertificateState.REVOKED: provisioning_pb2.REVOKED,
    CertificateState.EXPIRED: provisioning_pb2.CERTIFICATE_EXPIRED,
}


def _id_in(name: str, collection: str) -> str:
    prefix, _, ident = name.partition("/")
    if prefix != collection or not ident or "/" in ident:
        raise InvalidArgument(f"name {name!r} is not of the form {collection}/{{id}}")
    return ident


def _enrollment_id(name: str) -> int:
    ident = _id_in(name, "enrollments")
    if not ident.isdigit():
        raise InvalidArgument(f"name {name!r}: enrollment ids are numbers")
    return int(ident)


def _optional_device(name: str) -> str:
    return device_id_from_name(name) if name else ""


def _actor(context: Any) -> Actor:
    return Actor(f"tokens/{current_principal().token_id}", str(context.peer() or ""))


def _enrollment(view: EnrollmentView) -> provisioning_pb2.Enrollment:
    return provisioning_pb2.Enrollment(
        name=f"enrollments/{view.id}",
        device=f"devices/{view.device_id}",
        serial_number=view.serial_number,
        state=_ENROLLMENT_STATES[view.state],
        create_time=timestamp(view.created_at),
        expire_time=timestamp(view.expires_at),
        end_time=timestamp(view.ended_at),
        creator=view.creator,
    )


def _group(view: GroupView) -> provisioning_pb2.EnrollmentGroup:
    return provisioning_pb2.EnrollmentGroup(
        name=f"enrollmentGroups/{view.id}",
        description=view.description,
        ca_certificate_pem=view.ca_cert_pem,
        ca_fingerprint=view.ca_fingerprint,
        ca_subject=view.ca_subject,
        create_time=timestamp(view.created_at),
    )


def _certificate(view: CertificateView, *, with_pem: bool) -> provisioning_pb2.Certificate:
    return provisioning_pb2.Certificate(
        name=f"certificates/{view.serial}",
        device=f"devices/{view.device_id}",
        state=_CERTIFICATE_STATES[view.state],
        not_before=timestamp(view.not_before),
        not_after=timestamp(view.not_after),
        issue_time=timestamp(view.issued_at),
        end_time=timestamp(view.ended_at),
        revocation_reason=view.revocation_reason,
        authorization=view.authorization,
        fingerprint=view.fingerprint,
        pem=view.pem if with_pem else "",
    )


def _policy(policy: Policy, updated: Any) -> provisioning_pb2.ProvisioningPolicy:
    return provisioning_pb2.ProvisioningPolicy(
        certificate_validity_days=policy.certificate_validity_days,
        renewal_window_days=policy.renewal_window_days,
        default_code_ttl_seconds=policy.default_code_ttl_seconds,
        max_code_ttl_seconds=policy.max_code_ttl_seconds,
        update_time=timestamp(updated),
    )


def _event(entry: AuditEntry) -> provisioning_pb2.AuditEvent:
    return provisioning_pb2.AuditEvent(
        name=f"auditEvents/{entry.id}",
        time=timestamp(entry.at),
        action=entry.action,
        success=entry.success,
        device=f"devices/{entry.device_id}" if entry.device_id else "",
        serial_number=entry.serial_number,
        actor=entry.actor,
        source=entry.source,
        detail=entry.detail,
    )


class ProvisioningServicer(provisioning_pb2_grpc.ProvisioningServiceServicer):
    """Enrollments, enrollment groups, certificates, policy and audit log over gRPC."""

    def __init__(self, notifier: FeedNotifier, trust_client_ca: Callable[[bytes], None]) -> None:
        self._notifier = notifier
        # Other replicas pick a new group's CA up on their next trust refresh.
        self._trust_client_ca = trust_client_ca

    async def CreateEnrollment(
        self, request: provisioning_pb2.CreateEnrollmentRequest, context: Any
    ) -> provisioning_pb2.CreateEnrollmentResponse:
        enrollment, device, code = await enrollments.create_enrollment(
            device_from_proto(request.device_id, request.device),
            request.code_ttl_seconds,
            current_principal(),
            _actor(context),
            self._notifier,
        )
        return provisioning_pb2.CreateEnrollmentResponse(
            enrollment=_enrollment(enrollment),
            device=device_to_proto(device),
            enrollment_code=code,
        )

    async def GetEnrollment(
        self, request: provisioning_pb2.GetEnrollmentRequest, context: Any
    ) -> provisioning_pb2.Enrollment:
        view = await enrollments.get_enrollment(_enrollment_id(request.name), current_principal())
        return _enrollment(view)

    async def ListEnrollments(
        self, request: provisioning_pb2.ListEnrollmentsRequest, context: Any
    ) -> provisioning_pb2.ListEnrollmentsResponse:
        state = _ENROLLMENT_STATE_OF.get(request.state)
        if request.state and state is None:
            raise InvalidArgument(f"state {request.state} is not an enrollment state")
        page, token = await enrollments.list_enrollments(
            _optional_device(request.device),
            state,
            request.page_size,
            request.page_token,
            current_principal(),
        )
        return provisioning_pb2.ListEnrollmentsResponse(
            enrollments=[_enrollment(e) for e in page], next_page_token=token
        )

    async def CancelEnrollment(
        self, request: provisioning_pb2.CancelEnrollmentRequest, context: Any
    ) -> provisioning_pb2.Enrollment:
        view = await enrollments.cancel_enrollment(
            _enrollment_id(request.name), current_principal(), _actor(context)
        )
        return _enrollment(view)

    async def CreateEnrollmentGroup(
        self, request: provisioning_pb2.CreateEnrollmentGroupRequest, context: Any
    ) -> provisioning_pb2.EnrollmentGroup:
        group = request.enrollment_group
        view = await enrollment_groups.create_group(
            request.group_id, group.description, group.ca_certificate_pem, _actor(context)
        )
        self._trust_client_ca(view.ca_cert_pem.encode())
        return _group(view)

    async def GetEnrollmentGroup(
        self, request: provisioning_pb2.GetEnrollmentGroupRequest, context: Any
    ) -> provisioning_pb2.EnrollmentGroup:
        return _group(await enrollment_groups.get_group(_id_in(request.name, "enrollmentGroups")))

    async def ListEnrollmentGroups(
        self, request: provisioning_pb2.ListEnrollmentGroupsRequest, context: Any
    ) -> provisioning_pb2.ListEnrollmentGroupsResponse:
        page, token = await enrollment_groups.list_groups(request.page_size, request.page_token)
        return provisioning_pb2.ListEnrollmentGroupsResponse(
            enrollment_groups=[_group(g) for g in page], next_page_token=token
        )

    async def DeleteEnrollmentGroup(
        self, request: provisioning_pb2.DeleteEnrollmentGroupRequest, context: Any
    ) -> provisioning_pb2.DeleteEnrollmentGroupResponse:
        await enrollment_groups.delete_group(
            _id_in(request.name, "enrollmentGroups"), _actor(context)
        )
        return provisioning_pb2.DeleteEnrollmentGroupResponse()

    async def ListCertificates(
        self, request: provisioning_pb2.ListCertificatesRequest, context: Any
    ) -> provisioning_pb2.ListCertificatesResponse:
        page, token = await device_certificates.list_certificates(
            _optional_device(request.device),
            request.page_size,
            request.page_token,
            current_principal(),
        )
        return provisioning_pb2.ListCertificatesResponse(
            certificates=[_certificate(c, with_pem=False) for c in page], next_page_token=token
        )

    async def GetCertificate(
        self, request: provisioning_pb2.GetCertificateRequest, context: Any
    ) -> provisioning_pb2.Certificate:
        view = await device_certificates.get_certificate(
            _id_in(request.name, "certificates"), current_principal()
        )
        return _certificate(view, with_pem=True)

    async def RevokeCertificate(
        self, request: provisioning_pb2.RevokeCertificateRequest, context: Any
    ) -> provisioning_pb2.Certificate:
        view = await device_certificates.revoke_certificate(
            _id_in(request.name, "certificates"),
            request.reason,
            current_principal(),
            _actor(context),
        )
        return _certificate(view, with_pem=False)

    async def GetProvisioningPolicy(
        self, request: provisioning_pb2.GetProvisioningPolicyRequest, context: Any
    ) -> provisioning_pb2.ProvisioningPolicy:
        policy, updated = await load_policy()
        return _policy(policy, updated)

    async def UpdateProvisioningPolicy(
        self, request: provisioning_pb2.UpdateProvisioningPolicyRequest, context: Any
    ) -> provisioning_pb2.ProvisioningPolicy:
        changes = {
            path: int(getattr(request.policy, path))
            for path in request.update_mask.paths
            if path in request.policy.DESCRIPTOR.fields_by_name and path != "update_time"
        }
        unknown = set(request.update_mask.paths) - set(changes)
        if unknown:
            raise InvalidArgument(f"update_mask: unknown field {sorted(unknown)[0]!r}")
        policy, updated = await update_policy(changes, _actor(context))
        return _policy(policy, updated)

    async def ListAuditEvents(
        self, request: provisioning_pb2.ListAuditEventsRequest, context: Any
    ) -> provisioning_pb2.ListAuditEventsResponse:
        device_id = _optional_device(request.device)
        principal = current_principal()
        if principal.scope.terms:
            raise PermissionDenied("the audit log is not open to scoped tokens")
        page, token = await audit_log.list_events(device_id, request.page_size, request.page_token)
        return provisioning_pb2.ListAuditEventsResponse(
            events=[_event(e) for e in page], next_page_token=token
        )
