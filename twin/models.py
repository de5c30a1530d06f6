"""Tables of the twin package: devices, their twins, custom profiles, API tokens and the
change feed. Rows only; the rules live in the service modules."""

from __future__ import annotations

from typing import Any

from tortoise import fields
from tortoise.models import Model


class Device(Model):
    """One registered lamp, sensor or camera."""

    id = fields.CharField(primary_key=True, max_length=63)
    kind = fields.CharField(max_length=16, db_index=True)
    model = fields.CharField(max_length=64, db_index=True)
    serial_number = fields.CharField(max_length=128, unique=True)
    labels: Any = fields.JSONField(default=dict)
    latitude = fields.FloatField(null=True)
    longitude = fields.FloatField(null=True)
    site_id = fields.CharField(max_length=128, default="")
    state = fields.CharField(max_length=16, db_index=True)
    created_at = fields.DatetimeField()
    updated_at = fields.DatetimeField()
    last_seen_at = fields.DatetimeField(null=True)
    # Whether the device was heard from within its profile's heartbeat interval (x tolerance).
    online = fields.BooleanField(default=False, db_index=True)

    class Meta:
        table = "device"


class Twin(Model):
    """A device's desired and reported documents with their per-leaf metadata."""

    device_id = fields.CharField(primary_key=True, max_length=63)
    desired: Any = fields.JSONField(default=dict)
    reported: Any = fields.JSONField(default=dict)
    desired_metadata: Any = fields.JSONField(default=dict)
    reported_metadata: Any = fields.JSONField(default=dict)
    version = fields.BigIntField(default=0)
    updated_at = fields.DatetimeField(null=True)
    # The twin version at the last desired change: what acknowledgements refer to.
    desired_version = fields.BigIntField(default=0)
    # reconciliation.SyncStatus as JSON; null until desired state is first set.
    sync: Any = fields.JSONField(null=True)
    # The device's last acknowledgement (`$ack`) as it sent it.
    ack: Any = fields.JSONField(null=True)
    # When the reconciler should notify the device again (PENDING twins only).
    next_push_at = fields.DatetimeField(null=True, db_index=True)

    class Meta:
        table = "twin"


class CustomProfile(Model):
    """A device profile registered by an operator (built-in ones live in code)."""

    model = fields.CharField(primary_key=True, max_length=63)
    spec: Any = fields.JSONField()
    created_at = fields.DatetimeField()

    class Meta:
        table = "custom_profile"


class ApiToken(Model):
    """A bearer token. Only the SHA-256 of the secret is kept."""

    id = fields.IntField(primary_key=True)
    token_hash = fields.CharField(max_length=64, unique=True)
    role = fields.CharField(max_length=32)
    scope = fields.CharField(max_length=1024, default="")
    description = fields.CharField(max_length=256, default="")
    created_at = fields.DatetimeField()
    revoked_at = fields.DatetimeField(null=True)

    class Meta:
        table = "api_token"


class ChangeEntry(Model):
    """One entry of the durable, ordered change feed. Its `id` is the cursor."""

    id = fields.BigIntField(primary_key=True)
    device_id = fields.CharField(max_length=63)
    change_type = fields.CharField(max_length=32)
    # The device's selector-visible attributes at the time of the change, so that watchers
    # can filter the feed without joining (and see decommissioned devices' history).
    subject: Any = fields.JSONField()
    twin_version = fields.BigIntField(default=0)
    patch: Any = fields.JSONField(null=True)
    device: Any = fields.JSONField(null=True)
    created_at = fields.DatetimeField(db_index=True)

    class Meta:
        table = "change_entry"


class FeedState(Model):
    """A single row remembering up to which cursor the feed has been trimmed."""

    id = fields.IntField(primary_key=True)
    trimmed_through = fields.BigIntField(default=0)

    class Meta:
        table = "feed_state"


class TelemetrySample(Model):
    """One measurement a device sent as SenML, kept for the telemetry retention period."""

    id = fields.BigIntField(primary_key=True)
    device_id = fields.CharField(max_length=63)
    name = fields.CharField(max_length=128)
    at = fields.DatetimeField()
    number = fields.FloatField(null=True)
    text = fields.CharField(max_length=256, null=True)
    flag = fields.BooleanField(null=True)
    unit = fields.CharField(max_length=32, default="")

    class Meta:
        table = "telemetry_sample"
        indexes = (("device_id", "name", "at"), ("at",))


class Alarm(Model):
    """A fault a device reported, from first report until it reports it gone."""

    id = fields.BigIntField(primary_key=True)
    device_id = fields.CharField(max_length=63, db_index=True)
    property = fields.CharField(max_length=256)
    severity = fields.CharField(max_length=16)
    active = fields.BooleanField(default=True, db_index=True)
    first_seen_at = fields.DatetimeField()
    last_seen_at = fields.DatetimeField()
    cleared_at = fields.DatetimeField(null=True)
    acknowledged_at = fields.DatetimeField(null=True)
    acknowledged_by = fields.CharField(max_length=300, default="")
    note = fields.CharField(max_length=512, default="")

    class Meta:
        table = "alarm"
