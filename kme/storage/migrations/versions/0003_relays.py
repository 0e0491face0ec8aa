"""Relays through trusted nodes: each link counts the keys relays consumed; a relayed activation keeps its hops.

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('links', schema=None) as batch_op:
        batch_op.add_column(sa.Column('relayed', sa.BigInteger(), server_default='0', nullable=False))
    with op.batch_alter_table('incoming_activations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('relay', sa.Text(), nullable=True))


def downgrade():
    # In place (SQLite 3.35+ drops columns itself): copying links would trip the key_files foreign key.
    with op.batch_alter_table('incoming_activations', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('relay')
    with op.batch_alter_table('links', schema=None, recreate='never') as batch_op:
        batch_op.drop_column('relayed')
