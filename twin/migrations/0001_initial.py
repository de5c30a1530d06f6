from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise import fields

class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name='ApiToken',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('token_hash', fields.CharField(unique=True, max_length=64)),
                ('role', fields.CharField(max_length=32)),
                ('scope', fields.CharField(default='', max_length=1024)),
                ('description', fields.CharField(default='', max_length=256)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('revoked_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'api_token', 'app': 'twin', 'pk_attr': 'id', 'table_description': 'A bearer token. Only the SHA-256 of the secret is kept.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ChangeEntry',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('device_id', fields.CharField(max_length=63)),
                ('change_type', fields.CharField(max_length=32)),
                ('subject', fields.JSONField(encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('twin_version', fields.BigIntField(default=0)),
                ('patch', fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('device', fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('created_at', fields.DatetimeField(db_index=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'change_entry', 'app': 'twin', 'pk_attr': 'id', 'table_description': 'One entry of the durable, ordered change feed. Its `id` is the cursor.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='CustomProfile',
            fields=[
                ('model', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=63)),
                ('spec', fields.JSONField(encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'custom_profile', 'app': 'twin', 'pk_attr': 'model', 'table_description': 'A device profile registered by an operator (built-in ones live in code).'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Device',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=63)),
                ('kind', fields.CharField(db_index=True, max_length=16)),
                ('model', fields.CharField(db_index=True, max_length=64)),
                ('serial_number', fields.CharField(unique=True, max_length=128)),
                ('labels', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('latitude', fields.FloatField(null=True)),
                ('longitude', fields.FloatField(null=True)),
                ('site_id', fields.CharField(default='', max_length=128)),
                ('state', fields.CharField(db_index=True, max_length=16)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('updated_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('last_seen_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'device', 'app': 'twin', 'pk_attr': 'id', 'table_description': 'One registered lamp, sensor or camera.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='FeedState',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('trimmed_through', fields.BigIntField(default=0)),
            ],
            options={'table': 'feed_state', 'app': 'twin', 'pk_attr': 'id', 'table_description': 'A single row remembering up to which cursor the feed has been trimmed.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Twin',
            fields=[
                ('device_id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=63)),
                ('desired', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('reported', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('desired_metadata', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('reported_metadata', fields.JSONField(default=dict, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads)),
                ('version', fields.BigIntField(default=0)),
                ('updated_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'twin', 'app': 'twin', 'pk_attr': 'device_id', 'table_description': "A device's desired and reported documents with their per-leaf metadata."},
            bases=['Model'],
        ),
    ]
