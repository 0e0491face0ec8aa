"""Another vendor's key management system (ETSI GS QKD 020): the keys it passed us, by key ID and target SAE, the
keys we passed it until it acknowledges them, and the outbox of acknowledgements to it.

Revision ID: 0006
Revises: 0005
"""
import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade():
    op.create_table(
        'interop_keys',
        sa.Column('key_id', sa.String(length=36), nullable=False),
        sa.Column('target_sae_id', sa.BigInteger(), nullable=False),
        sa.Column('foreign_kms_id', sa.BigInteger(), nullable=False),
        sa.Column('initiator_sae_id', sa.BigInteger(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('ack_url', sa.Text(), nullable=False),
        sa.Column('created_at', sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint('key_id', 'target_sae_id'),
    )
    op.create_index('ix_interop_keys_foreign', 'interop_keys', ['foreign_kms_id', 'initiator_sae_id'])
    op.create_index('ix_interop_keys_state', 'interop_keys', ['state', 'created_at'])
    op.create_table(
        'interop_sent',
        sa.Column('key_id', sa.String(length=36), nullable=False),
        sa.Column('foreign_kms_id', sa.BigInteger(), nullable=False),
        sa.Column('initiator_sae_id', sa.BigInteger(), nullable=False),
        sa.Column('target_sae_id', sa.BigInteger(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('message', sa.Text(), nullable=False),
        sa.Column('created_at', sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint('key_id'),
    )
    op.create_index('ix_interop_sent_created_at', 'interop_sent', ['created_at'])
    op.create_table(
        'interop_acks',
        sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
        sa.Column('foreign_kms_id', sa.BigInteger(), nullable=False),
        sa.Column('url', sa.Text(), nullable=False),
        sa.Column('body', sa.Text(), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('attempts', sa.Integer(), nullable=False),
        sa.Column('next_at', sa.Float(), nullable=False),
        sa.Column('last_error', sa.Text(), nullable=False),
        sa.Column('created_at', sa.String(length=32), nullable=False),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_interop_acks_state', 'interop_acks', ['state', 'next_at'])


def downgrade():
    op.drop_index('ix_interop_acks_state', table_name='interop_acks')
    op.drop_table('interop_acks')
    op.drop_index('ix_interop_sent_created_at', table_name='interop_sent')
    op.drop_table('interop_sent')
    op.drop_index('ix_interop_keys_state', table_name='interop_keys')
    op.drop_index('ix_interop_keys_foreign', table_name='interop_keys')
    op.drop_table('interop_keys')
