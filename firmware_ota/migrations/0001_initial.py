from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise.fields.base import OnDelete
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name='Artifact',
            fields=[
                ('sha256', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64)),
                ('display_name', fields.CharField(max_length=100)),
                ('version', fields.CharField(max_length=64)),
                ('format', fields.CharField(max_length=16)),
                ('size', fields.BigIntField()),
                ('compatible_kinds', fields.JSONField(default=list, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('compatible_models', fields.JSONField(default=list, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('minimum_from_version', fields.CharField(default='', max_length=64)),
                ('release_notes', fields.TextField(default='', unique=False)),
                ('signing_key_id', fields.CharField(max_length=64)),
                ('security_counter', fields.BigIntField(null=True)),
                ('signature', fields.BinaryField()),
                ('chunk_size', fields.IntField()),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('uploaded_by', fields.CharField(max_length=300)),
            ],
            options={'table': 'artifact', 'app': 'firmware_ota', 'pk_attr': 'sha256', 'table_description': 'An accepted firmware image: its metadata here, its bytes in ArtifactChunk rows.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ArtifactChunk',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('artifact', fields.ForeignKeyField('firmware_ota.Artifact', source_field='artifact_id', db_constraint=True, to_field='sha256', related_name='chunks', on_delete=OnDelete.CASCADE)),
                ('index', fields.IntField()),
                ('data', fields.BinaryField()),
            ],
            options={'table': 'artifact_chunk', 'app': 'firmware_ota', 'unique_together': (('artifact', 'index'),), 'pk_attr': 'id', 'table_description': 'One fixed-size piece of an artifact (the last may be shorter), so a block-wise'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Campaign',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('display_name', fields.CharField(default='', max_length=200)),
                ('artifact', fields.ForeignKeyField('firmware_ota.Artifact', source_field='artifact_id', db_constraint=True, to_field='sha256', related_name='campaigns', on_delete=OnDelete.RESTRICT)),
                ('target_filter', fields.CharField(max_length=1024)),
                ('continuous', fields.BooleanField(default=False)),
                ('settings', fields.JSONField(encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('state', fields.CharField(db_index=True, max_length=16)),
                ('state_reason', fields.CharField(default='', max_length=500)),
                ('current_wave', fields.IntField(default=0)),
                ('wave_targets', fields.JSONField(default=list, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('approved_through', fields.IntField(default=-1)),
                ('next_position', fields.IntField(default=0)),
                ('seed', fields.CharField(max_length=64)),
                ('rollback_of', fields.BigIntField(null=True)),
                ('created_by', fields.CharField(max_length=300)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('started_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('ended_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('last_joined_scan_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('lease_owner', fields.CharField(default='', max_length=64)),
                ('lease_until', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('revision', fields.BigIntField(default=0)),
            ],
            options={'table': 'campaign', 'app': 'firmware_ota', 'pk_attr': 'id', 'table_description': 'A rollout campaign: its settings (fixed at creation), its state, and the lease of the'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='CampaignEvent',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('campaign', fields.ForeignKeyField('firmware_ota.Campaign', source_field='campaign_id', db_constraint=True, to_field='id', related_name='events', on_delete=OnDelete.CASCADE)),
                ('at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('action', fields.CharField(max_length=32)),
                ('actor', fields.CharField(max_length=300)),
                ('detail', fields.CharField(default='', max_length=1024)),
            ],
            options={'table': 'campaign_event', 'app': 'firmware_ota', 'pk_attr': 'id', 'table_description': 'One entry of the audit log of a campaign (append-only).'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Execution',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('campaign', fields.ForeignKeyField('firmware_ota.Campaign', source_field='campaign_id', db_constraint=True, to_field='id', related_name='executions', on_delete=OnDelete.CASCADE)),
                ('device_id', fields.CharField(db_index=True, max_length=63)),
                ('position', fields.IntField()),
                ('wave', fields.IntField()),
                ('state', fields.CharField(max_length=16)),
                ('action', fields.CharField(default='', max_length=16)),
                ('from_version', fields.CharField(default='', max_length=64)),
                ('attempt', fields.IntField(default=0)),
                ('progress', fields.IntField(default=0)),
                ('reason', fields.CharField(default='', max_length=32)),
                ('detail', fields.CharField(default='', max_length=256)),
                ('started_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('updated_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('ended_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('retry_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'execution', 'app': 'firmware_ota', 'unique_together': (('campaign', 'device_id'), ('campaign', 'position')), 'indexes': [Index(fields=['campaign_id', 'state'])], 'pk_attr': 'id', 'table_description': 'The update of one device within a campaign.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ManifestSigningKey',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('private_key_pem', fields.TextField(unique=False)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'manifest_signing_key', 'app': 'firmware_ota', 'pk_attr': 'id', 'table_description': 'The key of the service for SUIT manifests (one row), encrypted with the CA passphrase.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ReleaseKeyRecord',
            fields=[
                ('key_id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=64)),
                ('algorithm', fields.CharField(max_length=16)),
                ('public_key_der', fields.BinaryField()),
                ('display_name', fields.CharField(default='', max_length=200)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'release_key', 'app': 'firmware_ota', 'pk_attr': 'key_id', 'table_description': 'A public key firmware must be signed with (registered by an admin).'},
            bases=['Model'],
        ),
    ]
