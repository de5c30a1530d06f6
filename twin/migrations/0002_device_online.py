from tortoise import migrations
from tortoise.migrations import operations as ops
from tortoise import fields

class Migration(migrations.Migration):
    dependencies = [('twin', '0001_initial')]

    initial = False

    operations = [
        ops.AddField(
            model_name='Device',
            name='online',
            field=fields.BooleanField(default=False, db_index=True),
        ),
    ]
