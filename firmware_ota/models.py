"""Tables of the firmware_ota package."""

from __future__ import annotations

from typing import Any

from tortoise import fields
from tortoise.models import Model


class ReleaseKeyRecord(Model):
    """A public key firmware must be signed with (registered by an admin)."""

    key_id = fields.CharField(max_length=64, primary_key=True)
    algorithm = fields.CharField(max_length=16)
    public_key_der = fields.BinaryField()
    display_name = fields.CharField(max_length=200, default="")
    created_at = fields.DatetimeField()

    class Meta:
        table = "release_key"


class Artifact(Model):
    """An accepted firmware image: its metadata here, its bytes in ArtifactChunk rows."""

    sha256 = fields.CharField(max_length=64, primary_key=True)
    display_name = fields.CharField(max_length=100)
    version = fields.CharField(max_length=64)
    format = fields.CharField(max_length=16)
    size = fields.BigIntField()
    compatible_kinds: Any = fields.JSONField(default=list)
    compatible_models: Any = fields.JSONField(default=list)
    minimum_from_version = fields.CharField(max_length=64, default="")
    release_notes = fields.TextField(default="")
    signing_key_id = fields.CharField(max_length=64)
    security_counter = fields.BigIntField(null=True)
    signature = fields.BinaryField()
    chunk_size = fields.IntField()
    created_at = fields.DatetimeField()
    uploaded_by = fields.CharField(max_length=300)

    class Meta:
        table = "artifact"


class ArtifactChunk(Model):
    """One fixed-size piece of an artifact (the last may be shorter), so a block-wise
    download reads only the piece it needs."""

    id = fields.BigIntField(primary_key=True)
    artifact: fields.ForeignKeyRelation[Artifact] = fields.ForeignKeyField(
        "firmware_ota.Artifact", related_name="chunks", on_delete=fields.CASCADE
    )
    index = fields.IntField()
    data = fields.BinaryField()

    class Meta:
        table = "artifact_chunk"
        unique_together = (("artifact", "index"),)


class ManifestSigningKey(Model):
    """The key of the service for SUIT manifests (one row), encrypted with the CA passphrase.
    (Table comments go into SQL unescaped: no apostrophes in these docstrings.)"""

    id = fields.IntField(primary_key=True)
    private_key_pem = fields.TextField()
    created_at = fields.DatetimeField()

    class Meta:
        table = "manifest_signing_key"


class Campaign(Model):
    """A rollout campaign: its settings (fixed at creation), its state, and the lease of the
    replica driving it."""

    id = fields.BigIntField(primary_key=True)
    display_name = fields.CharField(max_length=200, default="")
    artifact: fields.ForeignKeyRelation[Artifact] = fields.ForeignKeyField(
        "firmware_ota.Artifact", related_name="campaigns", on_delete=fields.RESTRICT
    )
    target_filter = fields.CharField(max_length=1024)
    continuous = fields.BooleanField(default=False)
    # The campaign's settings as plain JSON, read back by firmware_ota.campaign_settings.
    settings: Any = fields.JSONField()
    state = fields.CharField(max_length=16, db_index=True)
    state_reason = fields.CharField(max_length=500, default="")
    current_wave = fields.IntField(default=0)
    # Cumulative device counts per wave, fixed when the campaign starts.
    wave_targets: Any = fields.JSONField(default=list)
    # Waves an operator approved (by resuming) although their predecessor asked for approval.
    approved_through = fields.IntField(default=-1)
    next_position = fields.IntField(default=0)
    seed = fields.CharField(max_length=64)
    rollback_of = fields.BigIntField(null=True)
    created_by = fields.CharField(max_length=300)
    created_at = fields.DatetimeField()
    started_at = fields.DatetimeField(null=True)
    ended_at = fields.DatetimeField(null=True)
    last_joined_scan_at = fields.DatetimeField(null=True)
    lease_owner = fields.CharField(max_length=64, default="")
    lease_until = fields.DatetimeField(null=True)
    # Bumped on every change of state or counts, so watchers know when to look again.
    revision = fields.BigIntField(default=0)

    class Meta:
        table = "campaign"


class Execution(Model):
    """The update of one device within a campaign."""

    id = fields.BigIntField(primary_key=True)
    campaign: fields.ForeignKeyRelation[Campaign] = fields.ForeignKeyField(
        "firmware_ota.Campaign", related_name="executions", on_delete=fields.CASCADE
    )
    device_id = fields.CharField(max_length=63, db_index=True)
    position = fields.IntField()
    wave = fields.IntField()
    state = fields.CharField(max_length=16)
    # The action of the job in the device's desired state: "download" or "install".
    action = fields.CharField(max_length=16, default="")
    from_version = fields.CharField(max_length=64, default="")
    attempt = fields.IntField(default=0)
    progress = fields.IntField(default=0)
    reason = fields.CharField(max_length=32, default="")
    detail = fields.CharField(max_length=256, default="")
    started_at = fields.DatetimeField(null=True)
    updated_at = fields.DatetimeField()
    ended_at = fields.DatetimeField(null=True)
    retry_at = fields.DatetimeField(null=True)

    class Meta:
        table = "execution"
        unique_together = (("campaign", "device_id"), ("campaign", "position"))
        indexes = (("campaign_id", "state"),)


class CampaignEvent(Model):
    """One entry of the audit log of a campaign (append-only)."""

    id = fields.BigIntField(primary_key=True)
    campaign: fields.ForeignKeyRelation[Campaign] = fields.ForeignKeyField(
        "firmware_ota.Campaign", related_name="events", on_delete=fields.CASCADE
    )
    at = fields.DatetimeField()
    action = fields.CharField(max_length=32)
    actor = fields.CharField(max_length=300)
    detail = fields.CharField(max_length=1024, default="")

    class Meta:
        table = "campaign_event"
