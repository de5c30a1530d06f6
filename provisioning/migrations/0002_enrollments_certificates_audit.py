from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('provisioning', '0001_initial')]

    initial = False

    operations = [
        ops.CreateModel(
            name='AuditEvent',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('action', fields.CharField(max_length=32)),
                ('success', fields.BooleanField()),
                ('device_id', fields.CharField(default='', db_index=True, max_length=63)),
                ('serial_number', fields.CharField(default='', max_length=128)),
                ('actor', fields.CharField(max_length=300)),
                ('source', fields.CharField(default='', max_length=128)),
                ('detail', fields.CharField(default='', max_length=1024)),
            ],
            options={'table': 'audit_event', 'app': 'provisioning', 'pk_attr': 'id', 'table_description': 'One entry of the provisioning audit log (append-only).'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='DeviceCertificate',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('serial', fields.CharField(unique=True, max_length=40)),
                ('device_id', fields.CharField(db_index=True, max_length=63)),
                ('fingerprint', fields.CharField(unique=True, max_length=64)),
                ('pem', fields.TextField(unique=False)),
                ('state', fields.CharField(max_length=16)),
                ('authorization', fields.CharField(max_length=128)),
                ('not_before', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('not_after', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('issued_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('ended_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
                ('revocation_reason', fields.CharField(default='', max_length=512)),
            ],
            options={'table': 'device_certificate', 'app': 'provisioning', 'pk_attr': 'id', 'table_description': 'A device certificate issued by the fleet CA, and whether it is still honoured.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='Enrollment',
            fields=[
                ('id', fields.BigIntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('device_id', fields.CharField(db_index=True, max_length=63)),
                ('serial_number', fields.CharField(db_index=True, max_length=128)),
                ('code_hash', fields.CharField(max_length=64)),
                ('state', fields.CharField(max_length=16)),
                ('creator', fields.CharField(max_length=300)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('expires_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
                ('ended_at', fields.DatetimeField(null=True, auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'enrollment', 'app': 'provisioning', 'pk_attr': 'id', 'table_description': 'A one-time permission for one registered device to obtain its first certificate.'},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='EnrollmentGroup',
            fields=[
                ('id', fields.CharField(primary_key=True, unique=True, db_index=True, max_length=63)),
                ('description', fields.CharField(default='', max_length=256)),
                ('ca_cert_pem', fields.TextField(unique=False)),
                ('ca_fingerprint', fields.CharField(unique=True, max_length=64)),
                ('ca_subject', fields.CharField(max_length=1024)),
                ('created_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'enrollment_group', 'app': 'provisioning', 'pk_attr': 'id', 'table_description': "A manufacturer's CA whose factory certificates may enroll registered devices."},
            bases=['Model'],
        ),
        ops.CreateModel(
            name='ProvisioningPolicyRow',
            fields=[
                ('id', fields.IntField(generated=True, primary_key=True, unique=True, db_index=True)),
                ('certificate_validity_days', fields.IntField()),
                ('renewal_window_days', fields.IntField()),
                ('default_code_ttl_seconds', fields.BigIntField()),
                ('max_code_ttl_seconds', fields.BigIntField()),
                ('updated_at', fields.DatetimeField(auto_now=False, auto_now_add=False)),
            ],
            options={'table': 'provisioning_policy', 'app': 'provisioning', 'pk_attr': 'id', 'table_description': 'The single row of provisioning rules shared by all replicas.'},
            bases=['Model'],
        ),
    ]
