from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields
from tortoise.indexes import Index

class Migration(migrations.Migration):
    dependencies = [('twin', '0002_device_online')]

    initial = False

    operations = [
        ops.CreateModel(
            name='TelemetrySample',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('device_id', fields.CharField(max_length=63)),
                ('name', fields.CharField(max_length=128)),
                ('at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('number', fields.FloatField(null=True)),
                ('text', fields.CharField(null=True, max_length=256)),
                ('flag', fields.BooleanField(null=True)),
                ('unit', fields.CharField(default='', max_length=32)),
            ],
            options={'table': 'telemetry_sample', 'app': 'twin', 'indexes': [Index(fields=['device_id', 'name', 'at']), Index(fields=['at'])], 'pk_attr': 'id', 'table_description': 'One measurement a device sent as SenML, kept for the telemetry retention period.'},
            bases=['Model'],
        ),
    ]
