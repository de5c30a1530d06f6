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
