"""Key streams across two KMEs: a chunk's row is claimed before its key is activated at the slave's KME, and marked
made once it was (rows from before were made at once); a stream remembers up to when its chunks were expired.

Revision ID: 0008
Revises: 0007
"""
import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('stream_chunks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('made', sa.Boolean(), server_default=sa.true(), nullable=False))
    with op.batch_alter_table('key_streams', schema=None) as batch_op:
        batch_op.add_column(sa.Column('expired_before', sa.String(length=32), nullable=True))


def downgrade():
    with op.batch_alter_table('key_streams', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('expired_before')
    with op.batch_alter_table('stream_chunks', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('made')
