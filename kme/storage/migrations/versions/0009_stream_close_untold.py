"""Key streams across two KMEs: a stream closed here whose other KME was not told yet is marked, in the close's own
transaction, until the background worker tells it.

Revision ID: 0009
Revises: 0008
"""
import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('key_streams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('close_untold', sa.Boolean(), server_default=sa.false(), nullable=False))


def downgrade():
    with op.batch_alter_table('key_streams', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('close_untold')
