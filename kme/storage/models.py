"""Database tables of the KME.

Only the kme.storage.keystore package writes key rows (pool_keys, key_fingerprints,
delivered_keys, key_slaves, activations, leases, interop_keys, interop_sent, interop_acks,
key_streams, stream_chunks) and the link counters and levels;
kme.operations.ingest writes key_files through it; kme.storage.events writes
events. SAEs and KMEs are not tables: the configuration file is their only source
of truth (see docs/design.md).
"""
from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    false,
    text,
    true,
)
from sqlalchemy.orm import Mapped, mapped_column

from kme import ids
from kme.storage.db import db
from kme.storage.pool_states import OURS, PEERS, RESERVED, UNCONFIRMED  # noqa: F401 (re-exported)

# SQLite only aliases ROWID (cheap, monotonic ids) for "INTEGER PRIMARY KEY".
Id = BigInteger().with_variant(Integer, "sqlite")


class StoredId(TypeDecorator):
    """An SAE or KME ID (kme.ids) as the database stores it: its signed 64-bit number. Values read back are
    numbers; the configuration names them (KmeConfig.kme_id)."""

    impl = BigInteger
    cache_ok = True

    def process_bind_param(self, value, dialect):
        return None if value is None else ids.number(value)


class Link(db.Model):
    """One key link: the local zone (peer_kme_id = this KME's ID) or the link to another KME.

    The counters are kept up to date by every change so that Get status and the
    entropy cost the same whatever the pool size. They count 256-bit pool keys:
    ingested = available + reserved + peer_held + unconfirmed + delivered
    + discarded + set_aside, always. ``lent`` and ``borrowed`` count keys moved
    between the two directions by leases (kme.storage.keystore.leases); the
    progress fields drive the exchange of ingestion progress with the peer
    (kme.storage.keystore.progress).
    """

    __tablename__ = "links"
    peer_kme_id: Mapped[int] = mapped_column(StoredId, primary_key=True, autoincrement=False)
    ingested: Mapped[int] = mapped_column(BigInteger, default=0)
    available: Mapped[int] = mapped_column(BigInteger, default=0)
    reserved: Mapped[int] = mapped_column(BigInteger, default=0)
    peer_held: Mapped[int] = mapped_column(BigInteger, default=0)
    delivered: Mapped[int] = mapped_column(BigInteger, default=0)
    discarded: Mapped[int] = mapped_column(BigInteger, default=0)
    unconfirmed: Mapped[int] = mapped_column(BigInteger, default=0)
    set_aside: Mapped[int] = mapped_column(BigInteger, default=0)
    lent: Mapped[int] = mapped_column(BigInteger, default=0)
    borrowed: Mapped[int] = mapped_column(BigInteger, default=0)
    # Pool keys of this link consumed by relays through trusted nodes (relayed keys, pads and MAC keys),
    # whatever became of them: a usage figure beside the fates above (kme.storage.keystore.relays).
    relayed: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    # The peer's database ID, our change sequence it acknowledged, its change
    # sequence we have applied, when it last answered, and its free keys then.
    peer_database: Mapped[str | None] = mapped_column(String(32))
    progress_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    progress_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    progress_at: Mapped[float] = mapped_column(Float, default=0.0)
    peer_free: Mapped[int] = mapped_column(BigInteger, default=0)
    # Leases asked of the peer: the next size (adapts to the rate of use) and when the last was asked.
    lease_size: Mapped[int] = mapped_column(BigInteger, default=0)
    lease_at: Mapped[float] = mapped_column(Float, default=0.0)
    # 256 little-endian uint64: how often each byte value occurs in the key
    # material this link holds (pool and keys waiting for their slave).
    byte_histogram: Mapped[bytes] = mapped_column(LargeBinary)


class Meta(db.Model):
    """Facts about this database, created with it: its random ID and the key fingerprint secret."""

    __tablename__ = "kme_meta"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[bytes] = mapped_column(LargeBinary)


class KeyFingerprint(db.Model):
    """A keyed 64-bit fingerprint of every key ever ingested, kept after the key is erased.

    The primary key refuses the same key material a second time, whatever
    file or folder it comes from. On SQLite it is the rowid itself: the
    smallest and fastest index there is.
    """

    __tablename__ = "key_fingerprints"
    fingerprint: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=False)


class KeyFile(db.Model):
    """A key file of a link; next_position makes ingestion resumable and idempotent.

    ``length`` is how many bytes of the file were read (a file that grows
    beyond it is read on); ``duplicates`` counts its keys refused because
    the same material was ingested before. The rest is the file's side of the
    progress exchange: ``peer_position`` is how many leading positions the
    peer says it holds, ``decided`` how many leading positions were confirmed
    or set aside here, ``offer_limit`` caps what we offer once keys only we
    held were set aside, ``seq`` orders our changes for the exchange and
    ``changed_at`` (epoch seconds) starts the grace period of unmatched keys,
    as does ``peer_reported_at``, when the peer last changed what it says it
    holds (None: it never said, and no key of the file is set aside). A file
    the peer named before we saw it has a row with nothing ingested.
    """

    __tablename__ = "key_files"
    __table_args__ = (UniqueConstraint("link_id", "name"), Index("ix_key_files_link_id_seq", "link_id", "seq"))
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId, ForeignKey("links.peer_kme_id"))
    name: Mapped[str] = mapped_column(String(255))
    next_position: Mapped[int] = mapped_column(BigInteger, default=0)
    complete: Mapped[bool] = mapped_column(Boolean, default=False)
    length: Mapped[int] = mapped_column(BigInteger, default=0)
    duplicates: Mapped[int] = mapped_column(BigInteger, default=0)
    ingested_at: Mapped[str | None] = mapped_column(String(32))
    peer_position: Mapped[int] = mapped_column(BigInteger, default=0)
    decided: Mapped[int] = mapped_column(BigInteger, default=0)
    offer_limit: Mapped[int | None] = mapped_column(BigInteger)
    seq: Mapped[int] = mapped_column(BigInteger, default=0)
    changed_at: Mapped[float] = mapped_column(Float, default=0.0)
    peer_reported_at: Mapped[float | None] = mapped_column(Float)


# PoolKey.state: the values of kme.storage.pool_states (imported from here by the key store).


class PoolKey(db.Model):
    """A 256-bit key of a link's pool, identified across the link by (file name, position)."""

    __tablename__ = "pool_keys"
    __table_args__ = (
        UniqueConstraint("file_id", "position"),
        # Claims take the lowest ids of a link in state OURS: a range scan.
        Index("ix_pool_keys_link_id_state_id", "link_id", "state", "id"),
        Index("ix_pool_keys_reservation", "reservation", sqlite_where=text("reservation IS NOT NULL"),
              postgresql_where=text("reservation IS NOT NULL")),
    )
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    file_id: Mapped[int] = mapped_column(Id, ForeignKey("key_files.id"))
    position: Mapped[int] = mapped_column(BigInteger)
    state: Mapped[int] = mapped_column(SmallInteger, default=OURS)
    reservation: Mapped[str | None] = mapped_column(String(36))
    material: Mapped[bytes] = mapped_column(LargeBinary)


class DeliveredKey(db.Model):
    """A key handed to its master SAE (or activated by a peer KME), waiting for its slave SAEs here."""

    __tablename__ = "delivered_keys"
    __table_args__ = (Index("ix_delivered_keys_created_at", "created_at"),)
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    master_sae_id: Mapped[int] = mapped_column(StoredId)
    material: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[str] = mapped_column(String(32))


class KeySlave(db.Model):
    """A slave SAE that may fetch a delivered key once; the key goes when all have fetched it."""

    __tablename__ = "key_slaves"
    key_id: Mapped[str] = mapped_column(String(36), ForeignKey("delivered_keys.key_id", ondelete="CASCADE"),
                                        primary_key=True)
    slave_sae_id: Mapped[int] = mapped_column(StoredId, primary_key=True)
    fetched: Mapped[bool] = mapped_column(Boolean, default=False)


class OutgoingActivation(db.Model):
    """An activation this KME asked a peer KME for, while its outcome is not settled."""

    __tablename__ = "outgoing_activations"
    activation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    # "sending": a web worker is waiting for the peer; "unknown": it gave up
    # without knowing whether the peer activated the keys.
    state: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[str] = mapped_column(String(32))
    request: Mapped[str] = mapped_column(Text)


class IncomingActivation(db.Model):
    """An activation a peer KME asked for: remembered so that retries and cancels are idempotent."""

    __tablename__ = "incoming_activations"
    __table_args__ = (Index("ix_incoming_activations_created_at", "created_at"),)
    activation_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    state: Mapped[str] = mapped_column(String(16))
    key_ids: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))
    # A relay (JSON): what this KME passed on, and to whom, so that a cancel reaches every hop after it.
    relay: Mapped[str | None] = mapped_column(Text)


class Lease(db.Model):
    """A lease of keys between the two directions of a link, remembered so that retries are idempotent.

    role "asked": we asked the peer and await its answer (``parts`` empty);
    role "given": the peer asked us and ``parts`` (JSON runs of positions)
    are what we gave.
    """

    __tablename__ = "leases"
    __table_args__ = (Index("ix_leases_created_at", "created_at"),)
    lease_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    role: Mapped[str] = mapped_column(String(8))
    parts: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))


class PoolLevel(db.Model):
    """A sample of a link's free keys per direction, for the debugging page's chart (last hour).

    ``inbound`` is the peer's free keys as it last said.
    """

    __tablename__ = "pool_levels"
    __table_args__ = (Index("ix_pool_levels_at", "at"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    at: Mapped[float] = mapped_column(Float)
    outbound: Mapped[int] = mapped_column(BigInteger)
    inbound: Mapped[int] = mapped_column(BigInteger)


class Heartbeat(db.Model):
    """When a background process last said it is alive (health checks read it)."""

    __tablename__ = "heartbeats"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    beat_at: Mapped[float] = mapped_column(Float)


class PeerStatus(db.Model):
    """The outcome of the last reachability probe of a peer KME's inter-KME interface."""

    __tablename__ = "peer_status"
    peer_kme_id: Mapped[int] = mapped_column(StoredId, primary_key=True, autoincrement=False)
    reachable: Mapped[bool] = mapped_column(Boolean)
    checked_at: Mapped[str] = mapped_column(String(32))
    detail: Mapped[str] = mapped_column(String(256))


class Event(db.Model):
    """A line of the KME's event log, as the debugging page shows it."""

    __tablename__ = "events"
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    created_at: Mapped[str] = mapped_column(String(32))
    # Text: PostgreSQL would refuse a longer line where SQLite kept it (migration 0002).
    message: Mapped[str] = mapped_column(Text)


class InteropKey(db.Model):
    """A key that a foreign KMS passed us (ETSI GS QKD 020 ext_keys), for one of its target SAEs: remembered so that
    a replay is answered, not delivered again, and so that a void knows the key.

    ``state``: "held" (waiting here for the target SAE, or fetched by it),
    "relayed" (passed on to the target's KME by relay), "failed", "voided".
    Only IDs and outcomes: the key itself is a delivered key while it waits.
    """

    __tablename__ = "interop_keys"
    __table_args__ = (Index("ix_interop_keys_foreign", "foreign_kms_id", "initiator_sae_id"),
                      Index("ix_interop_keys_state", "state", "created_at"))
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    target_sae_id: Mapped[int] = mapped_column(StoredId, primary_key=True, autoincrement=False)
    foreign_kms_id: Mapped[int] = mapped_column(StoredId)
    initiator_sae_id: Mapped[int] = mapped_column(StoredId)
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str] = mapped_column(Text)
    # Where the acknowledgement of a relay still under way goes, should the KME fail it later.
    ack_url: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))


class InteropSent(db.Model):
    """A key this KME passed to a foreign KMS for an SAE behind it (ETSI GS QKD 020 ext_keys), until the foreign
    KMS acknowledges it: "sending", then "relayed" or "failed" (with the foreign KMS's message, or ours)."""

    __tablename__ = "interop_sent"
    __table_args__ = (Index("ix_interop_sent_created_at", "created_at"),)
    key_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    foreign_kms_id: Mapped[int] = mapped_column(StoredId)
    initiator_sae_id: Mapped[int] = mapped_column(StoredId)
    target_sae_id: Mapped[int] = mapped_column(StoredId)
    state: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))


class InteropAck(db.Model):
    """An acknowledgement to POST to a foreign KMS's ``ack_callback_url`` (its outbox): sent by the background
    worker with retries; one that never arrives stays here as "failed", never dropped.

    ``body``: the JSON array of acknowledgement containers (key IDs and
    outcomes, never key material).
    """

    __tablename__ = "interop_acks"
    __table_args__ = (Index("ix_interop_acks_state", "state", "next_at"),)
    id: Mapped[int] = mapped_column(Id, primary_key=True)
    foreign_kms_id: Mapped[int] = mapped_column(StoredId)
    url: Mapped[str] = mapped_column(Text)
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer)
    next_at: Mapped[float] = mapped_column(Float)
    last_error: Mapped[str] = mapped_column(Text)
    created_at: Mapped[str] = mapped_column(String(32))


class KeyStream(db.Model):
    """An ETSI GS QKD 004 key stream between a master and a slave SAE (docs/etsi004.md): its chunks are keys of the
    stream's link, read by index at each end.

    Each end is "absent", "waiting" (the slave opened before the master) or
    "open"; ``closed`` once either end closed it; ``close_untold`` while the
    stream's other KME has not been told of a close made here. The chunks
    made before ``expired_before`` were expired already: each round of
    expiry looks only at those made since.
    """

    __tablename__ = "key_streams"
    ksid: Mapped[str] = mapped_column(String(36), primary_key=True)
    link_id: Mapped[int] = mapped_column(StoredId)
    master_sae_id: Mapped[int] = mapped_column(StoredId)
    slave_sae_id: Mapped[int] = mapped_column(StoredId)
    chunk_size: Mapped[int] = mapped_column(Integer)
    ttl_seconds: Mapped[int] = mapped_column(BigInteger)
    master_end: Mapped[str] = mapped_column(String(8))
    slave_end: Mapped[str] = mapped_column(String(8))
    closed: Mapped[bool] = mapped_column(Boolean)
    created_at: Mapped[str] = mapped_column(String(32))
    expired_before: Mapped[str | None] = mapped_column(String(32))
    close_untold: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class StreamChunk(db.Model):
    """A chunk of a key stream, by index: its key (a delivered key whose ID derives from the KSID and the index,
    nothing of its material) is read once by each end, then erased; the row stays while the stream lives, so that
    an index is never made twice. Not ``made`` while the master's KME activates it at the slave's KME."""

    __tablename__ = "stream_chunks"
    __table_args__ = (Index("ix_stream_chunks_created_at", "created_at"),)
    ksid: Mapped[str] = mapped_column(String(36), ForeignKey("key_streams.ksid", ondelete="CASCADE"),
                                      primary_key=True)
    idx: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    created_at: Mapped[str] = mapped_column(String(32))
    made: Mapped[bool] = mapped_column(Boolean, default=True, server_default=true())
