"""Tables of the provisioning package."""

from __future__ import annotations

from tortoise import fields
from tortoise.models import Model


class FleetCa(Model):
    """The one fleet CA every replica signs with. Private keys are encrypted PKCS#8."""

    id = fields.IntField(primary_key=True)
    root_cert_pem = fields.TextField()
    issuing_cert_pem = fields.TextField()
    issuing_key_pem = fields.TextField()
    # Absent for an imported CA whose root key stays with the operator.
    root_key_pem = fields.TextField(null=True)
    source = fields.CharField(max_length=16)
    created_at = fields.DatetimeField()

    class Meta:
        table = "fleet_ca"


class Enrollment(Model):
    """A one-time permission for one registered device to obtain its first certificate.
    Only a hash of the code is kept, bound to the serial number."""

    id = fields.BigIntField(primary_key=True)
    device_id = fields.CharField(max_length=63, db_index=True)
    serial_number = fields.CharField(max_length=128, db_index=True)
    code_hash = fields.CharField(max_length=64)
    # pending, used or cancelled; "expired" is derived from expires_at when read.
    state = fields.CharField(max_length=16)
    creator = fields.CharField(max_length=300)
    created_at = fields.DatetimeField()
    expires_at = fields.DatetimeField()
    ended_at = fields.DatetimeField(null=True)

    class Meta:
        table = "enrollment"


class EnrollmentGroup(Model):
    """A manufacturer's CA whose factory certificates may enroll registered devices."""

    id = fields.CharField(primary_key=True, max_length=63)
    description = fields.CharField(max_length=256, default="")
    ca_cert_pem = fields.TextField()
    ca_fingerprint = fields.CharField(max_length=64, unique=True)
    ca_subject = fields.CharField(max_length=1024)
    created_at = fields.DatetimeField()

    class Meta:
        table = "enrollment_group"


class DeviceCertificate(Model):
    """A device certificate issued by the fleet CA, and whether it is still honoured."""

    id = fields.BigIntField(primary_key=True)
    serial = fields.CharField(max_length=40, unique=True)
    device_id = fields.CharField(max_length=63, db_index=True)
    fingerprint = fields.CharField(max_length=64, unique=True)
    pem = fields.TextField()
    # valid, superseded or revoked; "expired" is derived from not_after when read.
    state = fields.CharField(max_length=16)
    authorization = fields.CharField(max_length=128)
    not_before = fields.DatetimeField()
    not_after = fields.DatetimeField()
    issued_at = fields.DatetimeField()
    ended_at = fields.DatetimeField(null=True)
    revocation_reason = fields.CharField(max_length=512, default="")

    class Meta:
        table = "device_certificate"


class ProvisioningPolicyRow(Model):
    """The single row of provisioning rules shared by all replicas."""

    id = fields.IntField(primary_key=True)
    certificate_validity_days = fields.IntField()
    renewal_window_days = fields.IntField()
    default_code_ttl_seconds = fields.BigIntField()
    max_code_ttl_seconds = fields.BigIntField()
    updated_at = fields.DatetimeField()

    class Meta:
        table = "provisioning_policy"


class AuditEvent(Model):
    """One entry of the provisioning audit log (append-only)."""

    id = fields.BigIntField(primary_key=True)
    at = fields.DatetimeField()
    action = fields.CharField(max_length=32)
    success = fields.BooleanField()
    device_id = fields.CharField(max_length=63, default="", db_index=True)
    serial_number = fields.CharField(max_length=128, default="")
    actor = fields.CharField(max_length=300)
    source = fields.CharField(max_length=128, default="")
    detail = fields.CharField(max_length=1024, default="")

    class Meta:
        table = "audit_event"
