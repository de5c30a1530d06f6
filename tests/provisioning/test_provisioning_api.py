"""ProvisioningService over gRPC against a real server: enrollments, enrollment groups, the
policy and the audit log. Enrollment over CoAP is in test_est_coaps.py."""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime, timedelta

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from google.protobuf.field_mask_pb2 import FieldMask

from citytwin.v1 import devices_pb2 as d
from citytwin.v1 import provisioning_pb2 as p
from tests.conftest import Api, Database, Deployment, Server, run_cli, unique

CODE = re.compile(r"[0-9A-HJKMNP-TV-Z]{4}(-[0-9A-HJKMNP-TV-Z]{4}){3}")


def lamp(serial: str, district: str = "north") -> d.Device:
    return d.Device(
        kind=d.LAMP,
        model="lamp-led-dimmable",
        serial_number=serial,
        labels={"district": district},
        location=d.Location(latitude=52.1, longitude=4.3, site_id="pole-N-0042"),
    )


def enroll(
    deployment: Deployment, serial: str, role: str = "installer", **kwargs: object
) -> p.CreateEnrollmentResponse:
    api = deployment.api(role)
    request = p.CreateEnrollmentRequest(device=lamp(serial), **kwargs)  # type: ignore[arg-type]
    response: p.CreateEnrollmentResponse = api.call(api.provisioning.CreateEnrollment, request)
    return response


def refused(call: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        call()  # type: ignore[operator]
    error = caught.value
    assert isinstance(error, grpc.Call)
    return error


def make_ca(name: str, *, is_ca: bool = True) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def test_create_enrollment_registers_the_device_and_returns_a_code_once(
    deployment: Deployment,
) -> None:
    serial = unique("SN")
    before = time.time()
    response = enroll(deployment, serial, device_id=unique("lamp"))
    assert CODE.fullmatch(response.enrollment_code)
    assert response.device.state == d.REGISTERED
    assert response.device.serial_number == serial
    enrollment = response.enrollment
    assert enrollment.state == p.PENDING
    assert enrollment.device == response.device.name
    assert enrollment.serial_number == serial
    assert enrollment.creator.startswith("tokens/")
    # The policy's default lifetime: one day.
    ttl = enrollment.expire_time.seconds - before
    assert 86400 - 5 < ttl < 86400 + 5
    api = deployment.api("viewer")
    fetched = api.call(api.provisioning.GetEnrollment, p.GetEnrollmentRequest(name=enrollment.name))
    assert fetched == enrollment
    assert response.enrollment_code not in str(fetched)


def test_code_lifetime_is_bounded_by_the_policy(deployment: Deployment) -> None:
    short = enroll(deployment, unique("SN"), code_ttl_seconds=120)
    assert short.enrollment.expire_time.seconds - short.enrollment.create_time.seconds == 120
    for ttl in (10, 31 * 24 * 3600, -5):
        error = refused(lambda ttl=ttl: enroll(deployment, unique("SN"), code_ttl_seconds=ttl))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "code_ttl_seconds" in (error.details() or "")


def test_a_taken_serial_number_creates_neither_device_nor_enrollment(
    deployment: Deployment,
) -> None:
    serial = unique("SN")
    first = enroll(deployment, serial)
    error = refused(lambda: enroll(deployment, serial))
    assert error.code() == grpc.StatusCode.ALREADY_EXISTS
    assert serial in (error.details() or "")
    api = deployment.api("admin")
    listed = api.call(
        api.provisioning.ListEnrollments, p.ListEnrollmentsRequest(device=first.device.name)
    )
    assert [e.name for e in listed.enrollments] == [first.enrollment.name]


def test_bad_device_fields_are_refused(deployment: Deployment) -> None:
    api = deployment.api("installer")
    for device, words in (
        (d.Device(kind=d.LAMP, model="lamp-led-dimmable"), "serial_number"),
        (d.Device(kind=d.LAMP, model="no-such-model", serial_number=unique("SN")), "model"),
        (d.Device(model="lamp-led-dimmable", serial_number=unique("SN")), "kind"),
    ):
        request = p.CreateEnrollmentRequest(device=device)
        error = refused(lambda r=request: api.call(api.provisioning.CreateEnrollment, r))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert words in (error.details() or "")


def test_cancel_stops_a_pending_enrollment_and_is_idempotent(deployment: Deployment) -> None:
    response = enroll(deployment, unique("SN"))
    api = deployment.api("installer")
    request = p.CancelEnrollmentRequest(name=response.enrollment.name)
    cancelled = api.call(api.provisioning.CancelEnrollment, request)
    assert cancelled.state == p.CANCELLED
    assert cancelled.HasField("end_time")
    again = api.call(api.provisioning.CancelEnrollment, request)
    assert again == cancelled
    for name in ("enrollments/999999999", "enrollments/x", "devices/1"):
        error = refused(
            lambda n=name: api.call(
                api.provisioning.CancelEnrollment, p.CancelEnrollmentRequest(name=n)
            )
        )
        assert error.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT)


def test_list_enrollments_filters_by_state_and_pages(deployment: Deployment) -> None:
    district = unique("d")
    api = deployment.api("admin")
    names = []
    for _ in range(5):
        request = p.CreateEnrollmentRequest(device=lamp(unique("SN"), district))
        names.append(api.call(api.provisioning.CreateEnrollment, request).enrollment.name)
    api.call(api.provisioning.CancelEnrollment, p.CancelEnrollmentRequest(name=names[1]))
    scoped = deployment.api(token=deployment.token("viewer", f"district={district}"))
    seen: list[str] = []
    token = ""
    while True:
        page = scoped.call(
            scoped.provisioning.ListEnrollments,
            p.ListEnrollmentsRequest(page_size=2, page_token=token),
        )
        seen.extend(e.name for e in page.enrollments)
        token = page.next_page_token
        if not token:
            break
    # Newest first; the scope hides every other test's enrollments.
    assert seen == list(reversed(names))
    cancelled = scoped.call(
        scoped.provisioning.ListEnrollments, p.ListEnrollmentsRequest(state=p.CANCELLED)
    )
    assert [e.name for e in cancelled.enrollments] == [names[1]]
    pending = scoped.call(
        scoped.provisioning.ListEnrollments, p.ListEnrollmentsRequest(state=p.PENDING)
    )
    assert len(pending.enrollments) == 4
    error = refused(
        lambda: scoped.call(
            scoped.provisioning.ListEnrollments,
            p.ListEnrollmentsRequest(page_token="garbage"),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_a_scoped_installer_enrolls_only_within_its_scope(deployment: Deployment) -> None:
    district = unique("d")
    installer = deployment.api(token=deployment.token("installer", f"district={district}"))
    inside = p.CreateEnrollmentRequest(device=lamp(unique("SN"), district))
    created = installer.call(installer.provisioning.CreateEnrollment, inside)
    assert created.device.labels["district"] == district
    outside = p.CreateEnrollmentRequest(device=lamp(unique("SN"), "elsewhere"))
    error = refused(lambda: installer.call(installer.provisioning.CreateEnrollment, outside))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    other = enroll(deployment, unique("SN"), role="admin")
    error = refused(
        lambda: installer.call(
            installer.provisioning.GetEnrollment, p.GetEnrollmentRequest(name=other.enrollment.name)
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    error = refused(
        lambda: installer.call(installer.provisioning.ListAuditEvents, p.ListAuditEventsRequest())
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.mark.parametrize("role", ["viewer", "service", "release-engineer"])
def test_only_installers_and_admins_create_enrollments(deployment: Deployment, role: str) -> None:
    error = refused(lambda: enroll(deployment, unique("SN"), role=role))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_enrollment_groups_crud_and_validation(deployment: Deployment) -> None:
    api = deployment.api("admin")
    group_id = unique("acme")
    pem = make_ca(f"ACME factory CA {group_id}")
    created = api.call(
        api.provisioning.CreateEnrollmentGroup,
        p.CreateEnrollmentGroupRequest(
            group_id=group_id,
            enrollment_group=p.EnrollmentGroup(description="ACME lamps", ca_certificate_pem=pem),
        ),
    )
    assert created.name == f"enrollmentGroups/{group_id}"
    assert created.ca_subject.startswith("CN=ACME factory CA")
    assert len(created.ca_fingerprint) == 64
    got = api.call(
        api.provisioning.GetEnrollmentGroup, p.GetEnrollmentGroupRequest(name=created.name)
    )
    assert got == created
    listed = api.call(api.provisioning.ListEnrollmentGroups, p.ListEnrollmentGroupsRequest())
    assert created.name in [g.name for g in listed.enrollment_groups]
    for group, pem_text, status in (
        (group_id, make_ca("another"), grpc.StatusCode.ALREADY_EXISTS),
        (unique("g"), pem, grpc.StatusCode.ALREADY_EXISTS),  # the same CA twice
        (unique("g"), make_ca("leaf", is_ca=False), grpc.StatusCode.INVALID_ARGUMENT),
        (unique("g"), "not a certificate", grpc.StatusCode.INVALID_ARGUMENT),
        ("Bad_Id", make_ca("x"), grpc.StatusCode.INVALID_ARGUMENT),
    ):
        request = p.CreateEnrollmentGroupRequest(
            group_id=group, enrollment_group=p.EnrollmentGroup(ca_certificate_pem=pem_text)
        )
        error = refused(lambda r=request: api.call(api.provisioning.CreateEnrollmentGroup, r))
        assert error.code() == status, error.details()
    installer = deployment.api("installer")
    error = refused(
        lambda: installer.call(
            installer.provisioning.DeleteEnrollmentGroup,
            p.DeleteEnrollmentGroupRequest(name=created.name),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    api.call(
        api.provisioning.DeleteEnrollmentGroup, p.DeleteEnrollmentGroupRequest(name=created.name)
    )
    error = refused(
        lambda: api.call(
            api.provisioning.GetEnrollmentGroup, p.GetEnrollmentGroupRequest(name=created.name)
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND


def test_policy_update_is_validated_and_audited(fresh_db: Database) -> None:
    admin_token = run_cli(fresh_db, "token", "create", "--role", "admin").stdout.strip()
    viewer_token = run_cli(fresh_db, "token", "create", "--role", "viewer").stdout.strip()
    server = Server(fresh_db).start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            api, viewer = Api(channel, admin_token), Api(channel, viewer_token)
            policy = api.call(
                api.provisioning.GetProvisioningPolicy, p.GetProvisioningPolicyRequest()
            )
            assert (policy.certificate_validity_days, policy.renewal_window_days) == (365, 30)
            assert (policy.default_code_ttl_seconds, policy.max_code_ttl_seconds) == (
                86400,
                30 * 86400,
            )
            assert not policy.HasField("update_time")
            update = p.UpdateProvisioningPolicyRequest(
                policy=p.ProvisioningPolicy(certificate_validity_days=90, renewal_window_days=7),
                update_mask=FieldMask(paths=["certificate_validity_days"]),
            )
            changed = api.call(api.provisioning.UpdateProvisioningPolicy, update)
            # Only the masked field changed.
            assert (changed.certificate_validity_days, changed.renewal_window_days) == (90, 30)
            assert changed.HasField("update_time")
            for policy_fields, paths in (
                ({"certificate_validity_days": 0}, ["certificate_validity_days"]),
                ({"renewal_window_days": 91}, ["renewal_window_days"]),
                ({"default_code_ttl_seconds": 10}, ["default_code_ttl_seconds"]),
                ({}, ["no_such_field"]),
                ({}, []),
            ):
                bad = p.UpdateProvisioningPolicyRequest(
                    policy=p.ProvisioningPolicy(**policy_fields),  # type: ignore[arg-type]
                    update_mask=FieldMask(paths=paths),
                )
                error = refused(
                    lambda r=bad: api.call(api.provisioning.UpdateProvisioningPolicy, r)
                )
                assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
            error = refused(
                lambda: viewer.call(viewer.provisioning.UpdateProvisioningPolicy, update)
            )
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
            after = viewer.call(
                viewer.provisioning.GetProvisioningPolicy, p.GetProvisioningPolicyRequest()
            )
            assert after.certificate_validity_days == 90
            events = api.call(api.provisioning.ListAuditEvents, p.ListAuditEventsRequest()).events
            assert [(e.action, e.detail) for e in events] == [
                ("policy.update", "certificate_validity_days=90")
            ]
    finally:
        server.stop()


def test_unknown_certificates(deployment: Deployment) -> None:
    api = deployment.api("admin")
    error = refused(
        lambda: api.call(
            api.provisioning.GetCertificate, p.GetCertificateRequest(name="certificates/abc")
        )
    )
    assert error.code() == grpc.StatusCode.NOT_FOUND
    error = refused(
        lambda: api.call(
            api.provisioning.RevokeCertificate,
            p.RevokeCertificateRequest(name="certificates/abc", reason=""),
        )
    )
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    installer = deployment.api("installer")
    error = refused(
        lambda: installer.call(
            installer.provisioning.RevokeCertificate,
            p.RevokeCertificateRequest(name="certificates/abc", reason="stolen"),
        )
    )
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED


def test_audit_log_records_administrative_actions(deployment: Deployment) -> None:
    response = enroll(deployment, unique("SN"))
    api = deployment.api("admin")
    api.call(
        api.provisioning.CancelEnrollment, p.CancelEnrollmentRequest(name=response.enrollment.name)
    )
    events = api.call(
        api.provisioning.ListAuditEvents, p.ListAuditEventsRequest(device=response.device.name)
    ).events
    assert [(e.action, e.success) for e in events] == [
        ("enrollment.cancel", True),
        ("enrollment.create", True),
    ]
    assert all(e.serial_number == response.device.serial_number for e in events)
    assert events[0].actor.startswith("tokens/")
    assert events[0].source  # the gRPC peer
    assert events[0].time.seconds >= events[1].time.seconds
