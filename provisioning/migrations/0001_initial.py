from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    initial = True

    operations = [
        ops.CreateModel(
            name='FleetCa',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('root_cert_pem', fields.TextField(unique=False)),
                ('issuing_cert_pem', fields.TextField(unique=False)),
                ('issuing_key_pem', fields.TextField(unique=False)),
                ('root_key_pem', fields.TextField(null=True, unique=False)),
                ('source', fields.CharField(max_length=16)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'fleet_ca', 'app': 'provisioning', 'pk_attr': 'id', 'table_description': 'The one fleet CA every replica signs with. Private keys are encrypted PKCS#8.'},
            bases=['Model'],
        ),
    ]
