"""ETSI GS QKD 004 key streams: each stream, and the chunks made of it by index.

Revision ID: 0007
Revises: 0006
"""
import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'key_streams',
        sa.Column('ksid', sa.String(length=36), nullable=False),
        sa.Column('link_id', sa.BigInteger(), nullable=False),
        sa.Column('master_sae_id', sa.BigInteger(), nullable=False),
        sa.Column('slave_sae_id', sa.BigInteger(), nullable=False),
        sa.Column('chunk_size', sa.Integer(), nullable=False),
        sa.Column('ttl_seconds', sa.BigInteger(), nullable=False),
        sa.Column('master_end', sa.String(length=8), nullable=False),
        sa.Column('slave_end', sa.String(length=8), nullable=False),
        sa.Column('closed', sa.Boolean(), nullable=False),
        sa.Column('created_at', sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint('ksid'),
    )
    op.create_table(
        'stream_chunks',
        sa.Column('ksid', sa.String(length=36), nullable=False),
        sa.Column('idx', sa.BigInteger(), nullable=False),
        sa.Column('created_at', sa.String(length=32), nullable=False),
        sa.ForeignKeyConstraint(['ksid'], ['key_streams.ksid'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('ksid', 'idx'),
    )
    op.create_index('ix_stream_chunks_created_at', 'stream_chunks', ['created_at'])


def downgrade():
    op.drop_index('ix_stream_chunks_created_at', table_name='stream_chunks')
    op.drop_table('stream_chunks')
    op.drop_table('key_streams')
