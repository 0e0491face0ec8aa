"""Database tables of the KME.

Only kme.keystore writes key rows (pool_keys, delivered_keys) and the link
counters; kme.ingest writes key_files through kme.keystore; kme.events writes
events. SAEs and KMEs are not tables: the configuration file is their only
source of truth (see docs/design.md).
"""
from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, LargeBinary, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from kme.db import db

# SQLite only aliases ROWID (cheap, monotonic ids) for "INTEGER PRIMARY KEY".
Id = BigInteger().with_variant(Integer, "sqlite")


class Link(db.Model):
    """One key link: the local zone (peer_kme_id = this KME's ID) or the link to another KME.

    The counters are kept up to date by every change so that Get status and the
    entropy cost the same whatever the pool size. They count 256-bit pool keys:
    ingested = available + delivered + discarded, always.
    """

    __tablename__ = "links"
    peer_kme_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    ingested: Mapped[int] = mapped_column(BigInteger, default=0)
    available: Mapped[int] = mapped_column(BigInteger, default=0)
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    discarded: Mapped[int] = mapped_column(BigInteger, default=0)
    # 256 little-endian uint64: how often each byte value occurs in the key
    # material this link holds (pool and keys waiting for their slave).
    byte_histogram: Mapped[bytes] = mapped_column(LargeBinary)


class KeyFile(db.Model):
    """A key file of a link; next_position makes ingestion resumable and idempotent."""

    __tablename__ = "key_files"
    __table_args__ = (UniqueConstraint("link_id", "name"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    link_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("links.peer_kme_id"))
    name: Mapped[str] = mapped_column(String(255))
    next_position: Mapped[int] = mapped_column(BigInteger, default=0)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    ingested_at: Mapped[str | None] = mapped_column(String(32))


class PoolKey(db.Model):
    """A 256-bit key of a link's pool, identified across the link by (file name, position)."""

    __tablename__ = "pool_keys"
    __table_args__ = (
        UniqueConstraint("file_id", "position"),
        # Claims take the lowest ids of a link: this index makes that a range scan.
        Index("ix_pool_keys_link_id_id", "link_id", "id"),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    link_id: Mapped[int] = mapped_column(BigInteger)
    file_id: Mapped[int] = mapped_column(Id, ForeignKey("key_files.id"))
    position: Mapped[int] = mapped_column(BigInteger)
    material: Mapped[bytes] = mapped_column(LargeBinary)


class DeliveredKey(db.Model):
    """A key handed to its master SAE and waiting for its slave SAE to fetch it."""

    __tablename__ = "delivered_keys"
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(BigInteger)
    master_sae_id: Mapped[int] = mapped_column(BigInteger)
    slave_sae_id: Mapped[int] = mapped_column(BigInteger)
    material: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[str] = mapped_column(String(32))


class Event(db.Model):
    """A line of the KME's event log, as the debugging page shows it."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    created_at: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(String(512))
