"""Event lines of any length: PostgreSQL refuses a line longer than VARCHAR(512), where SQLite kept it.

Revision ID: 0002
Revises: 0001
"""
import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.alter_column('message', existing_type=sa.VARCHAR(length=512), type_=sa.Text(),
                              existing_nullable=False)


def downgrade():
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.alter_column('message', existing_type=sa.Text(), type_=sa.VARCHAR(length=512),
                              existing_nullable=False, postgresql_using='substr(message, 1, 512)')
