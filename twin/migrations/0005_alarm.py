from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('twin', '0004_twin_sync_status')]

    initial = False

    operations = [
        ops.CreateModel(
            name='Alarm',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('device_id', fields.CharField(db_index=True, max_length=63)),
                ('property', fields.CharField(max_length=256)),
                ('severity', fields.CharField(max_length=16)),
                ('active', fields.BooleanField(default=True, db_index=True)),
                ('first_seen_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('last_seen_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('cleared_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('acknowledged_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('acknowledged_by', fields.CharField(default='', max_length=300)),
                ('note', fields.CharField(default='', max_length=512)),
            ],
            options={'table': 'alarm', 'app': 'twin', 'pk_attr': 'id', 'table_description': 'A fault a device reported, from first report until it reports it gone.'},
            bases=['Model'],
        ),
    ]
