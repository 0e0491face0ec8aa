"""A key file remembers when the peer last changed what it holds of it: a file the peer never reported is
never set aside.

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('key_files', schema=None, recreate='never') as batch_op:
        batch_op.add_column(sa.Column('peer_reported_at', sa.Float(), nullable=True))
    # A file of which the peer holds keys was reported: its grace period runs on as it did. Of the others we
    # cannot tell: ask the peer for all its progress again, so that it reports every file it knows.
    op.execute("UPDATE key_files SET peer_reported_at = changed_at WHERE peer_position > 0")
    op.execute("UPDATE links SET progress_seen = 0")


def downgrade():
    # In place (SQLite 3.35+ drops columns itself): copying key_files would trip the pool_keys foreign key.
    with op.batch_alter_table('key_files', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('peer_reported_at')
