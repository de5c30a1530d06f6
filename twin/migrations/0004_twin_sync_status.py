from tortoise import migrations
from tortoise.migrations import operations as ops
import functools
from json import dumps, loads
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('twin', '0003_telemetry_sample')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Twin',
            name='ack',
            field=fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads),
        ),
        ops.AddField(
            model_name='Twin',
            name='desired_version',
            field=fields.BigIntField(default=0),
        ),
        ops.AddField(
            model_name='Twin',
            name='next_push_at',
            field=fields.DatetimeField(null=True, db_index=True, auto_now=False, auto_now_add=False),
        ),
        ops.AddField(
            model_name='Twin',
            name='sync',
            field=fields.JSONField(null=True, encoder=functools.partial(dumps, separators=(',', ':')), decoder=loads),
        ),
    ]
