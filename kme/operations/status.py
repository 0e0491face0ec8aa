"""Read-only views of a KME for operators: links, SAEs, events (debug page, metrics, kme-status)."""
from sqlalchemy import func, select

from kme import ids
from kme.config import KmeConfig
from kme.ids import Id
from kme.key_math import entropy
from kme.operations import health
from kme.storage import at_rest
from kme.storage.db import db
from kme.storage.keystore import common
from kme.storage.keystore import interop as interop_store
from kme.storage.keystore import streams as stream_store
from kme.storage.models import DeliveredKey, KeyFile, Link


def links(config: KmeConfig) -> list[dict]:
    """Every link's counters, directions, pool history, keys waiting, files, last file and peer reachability.

    Counts over key_files and delivered_keys are fine here: they serve
    operators' pages and scrapes, never an SAE request.
    """
    session = db.session
    waiting = dict(session.execute(select(DeliveredKey.link_id, func.count()).group_by(DeliveredKey.link_id)).all())
    files = dict(session.execute(select(KeyFile.link_id, func.count()).where(KeyFile.complete)
                                 .group_by(KeyFile.link_id)).all())
    duplicates = dict(session.execute(select(KeyFile.link_id, func.sum(KeyFile.duplicates))
                                      .group_by(KeyFile.link_id)).all())
    peers = health.peer_statuses()
    interop = interop_store.summary()["by_kms"] if config.foreign_kms else {}
    result = []
    # Rows name links by the numbers that store their KME IDs; operators see the IDs, in their order.
    rows = sorted(session.scalars(select(Link)).all(), key=lambda row: ids.order(config.kme_id(row.peer_kme_id)))
    for row in rows:
        last = session.execute(select(KeyFile.name, KeyFile.ingested_at).where(
            KeyFile.link_id == row.peer_kme_id, KeyFile.complete).order_by(KeyFile.id.desc()).limit(1)).first()
        link = config.kme_id(row.peer_kme_id)
        # A foreign KMS's row counts the keys it passed us: no pool, no directions, no peer of ours.
        local = link == config.this_kme.id or link in config.foreign_kms_by_id
        result.append({
            "link": link,
            "name": _name(config, link),
            "ingested": row.ingested, "available": row.available, "reserved": row.reserved,
            "peer_held": row.peer_held, "delivered": row.delivered, "discarded": row.discarded,
            "unconfirmed": row.unconfirmed, "set_aside": row.set_aside, "relayed": row.relayed,
            "directions": [] if local else _directions(config.this_kme.id, link, row),
            "history": [] if local else common.level_history(row.peer_kme_id),
            "waiting": waiting.get(row.peer_kme_id, 0),
            "files": files.get(row.peer_kme_id, 0),
            "duplicates": duplicates.get(row.peer_kme_id) or 0,
            "last_file": last.name if last else None,
            "last_file_at": last.ingested_at if last else None,
            "byte_counts": entropy.merge([at_rest.open_histogram(row.peer_kme_id, row.byte_histogram)]),
            "interop": _interop(interop, row.peer_kme_id) if link in config.foreign_kms_by_id else None,
            "peer": None if local else peers.get(row.peer_kme_id, {"reachable": False, "checked_at": None,
                                                                     "detail": "not probed yet"}),
        })
    session.commit()
    return result


def _directions(this_kme_id: Id, link: Id, row: Link) -> list[dict]:
    """The two directions of a link: free keys, keys leased into it so far, keys in flight.

    The peer's free keys are as it last said (progress exchange or lease);
    what it has in flight only it knows.
    """
    return [
        {"from": this_kme_id, "to": link, "available": row.available, "leased": row.borrowed,
         "in_use": row.reserved},
        {"from": link, "to": this_kme_id, "available": row.peer_free, "leased": row.lent,
         "in_use": None},
    ]


def routes(config: KmeConfig) -> list[dict]:
    """How this KME reaches every other KME: directly, or through the neighbour its route names."""
    direct = [{"kme_id": peer.id, "via": peer.id, "kind": "linked"} for peer in config.other_kmes]
    routed = [{"kme_id": kme_id, "via": via, "kind": "relayed"} for kme_id, via in config.routes]
    return sorted(direct + routed, key=lambda route: ids.order(route["kme_id"]))


def saes(config: KmeConfig) -> list[dict]:
    """The registered SAEs: ID, KME, and for SAEs of this KME their certificate serial in hex."""
    return [{"id": sae.id, "kme_id": sae.kme_id, "local": sae.kme_id == config.this_kme.id,
             "serial": format(sae.certificate_serial, "X") if sae.certificate_serial is not None else None}
            for sae in config.saes]


def streams(config: KmeConfig) -> list[dict]:
    """The ETSI GS QKD 004 key streams, newest first: their SAEs, chunk size, TTL, ends, the chunks made and those
    still waiting for an end (no key, nor a chunk's bytes)."""
    return [{"ksid": stream.ksid, "master": config.sae_id(stream.master_sae_id),
             "slave": config.sae_id(stream.slave_sae_id), "chunk_size": stream.chunk_size,
             "ttl_seconds": stream.ttl_seconds, "master_end": stream.master_end, "slave_end": stream.slave_end,
             "closed": stream.closed, "chunks_made": made, "chunks_waiting": waiting}
            for stream, made, waiting in stream_store.overview()]


def _interop(by_kms: dict, stored: int) -> dict:
    """A foreign KMS's keys by state and its acknowledgements by state."""
    figures = by_kms.get(stored, {"keys": {}, "acks": {}})
    return {"keys": figures["keys"], "acks": figures["acks"]}


def failed_acks(config: KmeConfig) -> list[dict]:
    """The newest acknowledgements to foreign KMSs that were given up: where they went, why, when."""
    return [{"id": ack_id, "foreign_kms": config.kme_id(foreign), "url": url, "attempts": attempts, "error": error,
             "created_at": created_at}
            for ack_id, foreign, url, attempts, error, created_at in interop_store.summary()["failed_acks"]]


def _name(config: KmeConfig, link: Id) -> str:
    if link == config.this_kme.id:
        return "local zone"
    if link in config.foreign_kms_by_id:
        return f"foreign KMS {link} (ETSI GS QKD 020)"
    return f"link with KME {link}"
