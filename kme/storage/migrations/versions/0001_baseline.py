"""The schema of the releases before schema versions: a database they made has these tables and no version.

Revision ID: 0001
Revises: (none)
"""
import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    op.create_table('delivered_keys',
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('master_sae_id', sa.BigInteger(), nullable=False),
    sa.Column('material', sa.LargeBinary(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('key_id')
    )
    with op.batch_alter_table('delivered_keys', schema=None) as batch_op:
        batch_op.create_index('ix_delivered_keys_created_at', ['created_at'], unique=False)

    op.create_table('events',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('message', sa.String(length=512), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('heartbeats',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('beat_at', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('incoming_activations',
    sa.Column('activation_id', sa.String(length=36), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('key_ids', sa.Text(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('activation_id')
    )
    with op.batch_alter_table('incoming_activations', schema=None) as batch_op:
        batch_op.create_index('ix_incoming_activations_created_at', ['created_at'], unique=False)

    op.create_table('key_fingerprints',
    sa.Column('fingerprint', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.PrimaryKeyConstraint('fingerprint')
    )
    op.create_table('kme_meta',
    sa.Column('name', sa.String(length=32), nullable=False),
    sa.Column('value', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('leases',
    sa.Column('lease_id', sa.String(length=36), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=False),
    sa.Column('parts', sa.Text(), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.PrimaryKeyConstraint('lease_id')
    )
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.create_index('ix_leases_created_at', ['created_at'], unique=False)

    op.create_table('links',
    sa.Column('peer_kme_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('ingested', sa.BigInteger(), nullable=False),
    sa.Column('available', sa.BigInteger(), nullable=False),
    sa.Column('reserved', sa.BigInteger(), nullable=False),
    sa.Column('peer_held', sa.BigInteger(), nullable=False),
    sa.Column('delivered', sa.BigInteger(), nullable=False),
    sa.Column('discarded', sa.BigInteger(), nullable=False),
    sa.Column('unconfirmed', sa.BigInteger(), nullable=False),
    sa.Column('set_aside', sa.BigInteger(), nullable=False),
    sa.Column('lent', sa.BigInteger(), nullable=False),
    sa.Column('borrowed', sa.BigInteger(), nullable=False),
    sa.Column('peer_database', sa.String(length=32), nullable=True),
    sa.Column('progress_sent', sa.BigInteger(), nullable=False),
    sa.Column('progress_seen', sa.BigInteger(), nullable=False),
    sa.Column('progress_at', sa.Float(), nullable=False),
    sa.Column('peer_free', sa.BigInteger(), nullable=False),
    sa.Column('lease_size', sa.BigInteger(), nullable=False),
    sa.Column('lease_at', sa.Float(), nullable=False),
    sa.Column('byte_histogram', sa.LargeBinary(), nullable=False),
    sa.PrimaryKeyConstraint('peer_kme_id')
    )
    op.create_table('outgoing_activations',
    sa.Column('activation_id', sa.String(length=36), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.String(length=32), nullable=False),
    sa.Column('request', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('activation_id')
    )
    op.create_table('peer_status',
    sa.Column('peer_kme_id', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('reachable', sa.Boolean(), nullable=False),
    sa.Column('checked_at', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.String(length=256), nullable=False),
    sa.PrimaryKeyConstraint('peer_kme_id')
    )
    op.create_table('pool_levels',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('at', sa.Float(), nullable=False),
    sa.Column('outbound', sa.BigInteger(), nullable=False),
    sa.Column('inbound', sa.BigInteger(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('pool_levels', schema=None) as batch_op:
        batch_op.create_index('ix_pool_levels_at', ['at'], unique=False)

    op.create_table('key_files',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('next_position', sa.BigInteger(), nullable=False),
    sa.Column('complete', sa.Boolean(), nullable=False),
    sa.Column('length', sa.BigInteger(), nullable=False),
    sa.Column('duplicates', sa.BigInteger(), nullable=False),
    sa.Column('ingested_at', sa.String(length=32), nullable=True),
    sa.Column('peer_position', sa.BigInteger(), nullable=False),
    sa.Column('decided', sa.BigInteger(), nullable=False),
    sa.Column('offer_limit', sa.BigInteger(), nullable=True),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('changed_at', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['link_id'], ['links.peer_kme_id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('link_id', 'name')
    )
    with op.batch_alter_table('key_files', schema=None) as batch_op:
        batch_op.create_index('ix_key_files_link_id_seq', ['link_id', 'seq'], unique=False)

    op.create_table('key_slaves',
    sa.Column('key_id', sa.String(length=36), nullable=False),
    sa.Column('slave_sae_id', sa.BigInteger(), nullable=False),
    sa.Column('fetched', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['key_id'], ['delivered_keys.key_id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('key_id', 'slave_sae_id')
    )
    op.create_table('pool_keys',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('link_id', sa.BigInteger(), nullable=False),
    sa.Column('file_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('position', sa.BigInteger(), nullable=False),
    sa.Column('state', sa.SmallInteger(), nullable=False),
    sa.Column('reservation', sa.String(length=36), nullable=True),
    sa.Column('material', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['file_id'], ['key_files.id'], ),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('file_id', 'position')
    )
    with op.batch_alter_table('pool_keys', schema=None) as batch_op:
        batch_op.create_index('ix_pool_keys_link_id_state_id', ['link_id', 'state', 'id'], unique=False)
        batch_op.create_index('ix_pool_keys_reservation', ['reservation'], unique=False, sqlite_where=sa.text('reservation IS NOT NULL'), postgresql_where=sa.text('reservation IS NOT NULL'))



def downgrade():
    with op.batch_alter_table('pool_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_pool_keys_reservation', sqlite_where=sa.text('reservation IS NOT NULL'), postgresql_where=sa.text('reservation IS NOT NULL'))
        batch_op.drop_index('ix_pool_keys_link_id_state_id')

    op.drop_table('pool_keys')
    op.drop_table('key_slaves')
    with op.batch_alter_table('key_files', schema=None) as batch_op:
        batch_op.drop_index('ix_key_files_link_id_seq')

    op.drop_table('key_files')
    with op.batch_alter_table('pool_levels', schema=None) as batch_op:
        batch_op.drop_index('ix_pool_levels_at')

    op.drop_table('pool_levels')
    op.drop_table('peer_status')
    op.drop_table('outgoing_activations')
    op.drop_table('links')
    with op.batch_alter_table('leases', schema=None) as batch_op:
        batch_op.drop_index('ix_leases_created_at')

    op.drop_table('leases')
    op.drop_table('kme_meta')
    op.drop_table('key_fingerprints')
    with op.batch_alter_table('incoming_activations', schema=None) as batch_op:
        batch_op.drop_index('ix_incoming_activations_created_at')

    op.drop_table('incoming_activations')
    op.drop_table('heartbeats')
    op.drop_table('events')
    with op.batch_alter_table('delivered_keys', schema=None) as batch_op:
        batch_op.drop_index('ix_delivered_keys_created_at')

    op.drop_table('delivered_keys')
