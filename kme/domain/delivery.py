"""The three ETSI GS QKD 014 methods as plain functions of explicit arguments.

No Flask request here: views, the CLI and tests call these directly. Errors
are kme.errors domain errors with the standard's messages.
"""
from kme import ids
from kme.config import KmeConfig, Sae
from kme.domain import activation, interop, relay
from kme.errors import EXTENSION_MANDATORY_UNSUPPORTED, SIZE_NOT_MULTIPLE_OF_8, BadRequest, KeysNotFound, NotAuthorized
from kme.ids import Id
from kme.key_math import entropy
from kme.storage.keystore import common
from kme.storage.keystore import local as keystore_local
from kme.storage.keystore.common import DeliveredKeyMaterial

# Key counts in Get status stop here: the status parser of the C library under the strongSwan and OpenSSL QKD
# plugins refuses any count above a signed 32-bit integer, and a larger one tells an SAE nothing more.
STATUS_COUNT_MAX = 2**31 - 1


def parse_sae_id(config: KmeConfig, text: str) -> Sae:
    """The SAE named in a URL; 400 if it is not a registered SAE."""
    sae = config.saes_by_id.get(ids.from_text(text))
    if sae is None:
        raise BadRequest(f"SAE {text} is not known to this KME")
    return sae


def _slave(config: KmeConfig, master: Sae, slave_id: str) -> Sae:
    slave = parse_sae_id(config, slave_id)
    if slave.id == master.id:
        raise BadRequest("master and slave SAE shall differ")
    return slave


def get_status(config: KmeConfig, master: Sae, slave_id: str) -> dict:
    """Status (6.1) of the link between ``master`` and the slave SAE."""
    slave = _slave(config, master, slave_id)
    limits = config.this_kme.limits
    # A relayed slave's keys come from the link of the first hop (each trusted node's next link must have some too).
    hop = config.next_hop(slave.kme_id)
    link_id = config.this_kme.id if hop is None else hop.id
    counts = common.link_counts(link_id)
    # Keys the peer's direction holds free are lent on demand: this direction can serve them too.
    available = counts.available + (counts.peer_free if link_id != config.this_kme.id else 0)
    return {
        "source_KME_ID": config.this_kme.id,
        "target_KME_ID": slave.kme_id,
        "master_SAE_ID": master.id,
        "slave_SAE_ID": slave.id,
        "key_size": limits.key_size,
        "stored_key_count": min(available // common.pool_keys_per_key(limits.key_size), STATUS_COUNT_MAX),
        "max_key_count": min(limits.max_key_count, STATUS_COUNT_MAX),
        "max_key_per_request": limits.max_key_per_request,
        "max_key_size": limits.max_key_size,
        "min_key_size": limits.min_key_size,
        "max_SAE_ID_count": limits.max_SAE_ID_count,
    }


def _check_key_request(config: KmeConfig, request: dict) -> tuple[int, int]:
    limits = config.this_kme.limits
    unsupported = [name for extension in request.get("extension_mandatory", []) for name in extension]
    if unsupported:
        raise BadRequest(EXTENSION_MANDATORY_UNSUPPORTED,
                          [{"extension_mandatory_unsupported": f"{name} is not supported"} for name in unsupported])
    additional = request.get("additional_slave_SAE_IDs", [])
    if len(additional) > limits.max_SAE_ID_count:
        raise BadRequest(f"additional_slave_SAE_IDs: at most {limits.max_SAE_ID_count} "
                          f"(max_SAE_ID_count of this KME)")
    number = request.get("number", 1)
    if not 1 <= number <= limits.max_key_per_request:
        raise BadRequest(f"number shall be between 1 and {limits.max_key_per_request}")
    size = request.get("size", limits.key_size)
    if size % 8:
        raise BadRequest(SIZE_NOT_MULTIPLE_OF_8)
    if not limits.min_key_size <= size <= limits.max_key_size:
        raise BadRequest(f"size shall be between {limits.min_key_size} and {limits.max_key_size}")
    return number, size


def _slaves(config: KmeConfig, master: Sae, primary: Sae, additional: list[Id]) -> list[Sae]:
    slaves = [primary]
    for sae_id in additional:
        sae = config.saes_by_id.get(sae_id)
        if sae is None:
            raise BadRequest(f"additional_slave_SAE_IDs: SAE {sae_id} is not known to this KME")
        if sae.id == master.id or sae in slaves:
            raise BadRequest(f"additional_slave_SAE_IDs: SAE {sae_id} is the master or named twice")
        slaves.append(sae)
    return slaves


def get_key(config: KmeConfig, master: Sae, slave_id: str, request: dict) -> list[DeliveredKeyMaterial]:
    """Get key (5.3): new keys for ``master`` to share with the slave SAE(s), taken from the pool.

    Slaves of this KME fetch the keys here; slaves behind one linked KME get
    them activated there first; slaves behind KMEs reached through trusted
    nodes, or behind several other KMEs, get them by relay (kme.domain.relay);
    a slave behind a foreign KMS gets them through it (kme.domain.interop).
    """
    slave = _slave(config, master, slave_id)
    number, size = _check_key_request(config, request)
    slaves = _slaves(config, master, slave, request.get("additional_slave_SAE_IDs", []))
    if any(sae.kme_id in config.foreign_kms_by_id for sae in slaves):
        if len(slaves) > 1:
            raise BadRequest("an SAE behind a foreign KMS is the only slave of its request")
        return interop.send(config, master, slave, number, size)
    this_id = config.this_kme.id
    local_slaves = [sae for sae in slaves if sae.kme_id == this_id]
    remote: dict[int, list[Sae]] = {}
    for sae in slaves:
        if sae.kme_id != this_id:
            remote.setdefault(sae.kme_id, []).append(sae)
    if not remote:
        return keystore_local.deliver_local(this_id, master.id, [sae.id for sae in local_slaves], number, size)
    peer = config.other_kmes_by_id.get(next(iter(remote))) if len(remote) == 1 else None
    if peer is not None:
        return activation.activate_at_peer(config, peer, master, remote[peer.id], local_slaves, number, size)
    return relay.send(config, master, {kme_id: [sae.id for sae in saes] for kme_id, saes in remote.items()},
                      [sae.id for sae in local_slaves], number, size)


def get_key_with_key_ids(config: KmeConfig, slave: Sae, master_id: str, key_ids: list[str],
                         named_masters: set = frozenset()) -> list[DeliveredKeyMaterial]:
    """Get key with key IDs (5.4): the keys a master SAE obtained for ``slave``, erased once handed out.

    ``named_masters``: the master SAE IDs the request's items name besides
    the URL (a client's dialect); each must be the URL's master.
    """
    master = parse_sae_id(config, master_id)
    if others := named_masters - {master.id}:
        raise BadRequest(f"key_IDs: master_SAE_ID {min(others, key=ids.order)} is not the master SAE of the URL "
                         f"({master.id})")
    if len(set(key_ids)) != len(key_ids):
        raise BadRequest("key_IDs: the same key ID is requested twice")
    if len(key_ids) > config.this_kme.limits.max_key_per_request:
        raise BadRequest(f"key_IDs: at most {config.this_kme.limits.max_key_per_request} per request")
    return keystore_local.fetch_delivered(master.id, slave.id, key_ids,
                                          lambda found: _may_fetch(slave.id, key_ids, found))


def _may_fetch(slave_id: Id, key_ids: list[str], found: dict[str, tuple[bool, bool | None]]) -> None:
    """Who may fetch: only a slave SAE of every key (401), each key once, all of them made by the URL's master
    (else the standard's 400). ``found``: for each key that exists, whether that master made it and whether this
    slave fetched it (None: it is not one of its slaves)."""
    if any(fetched is None for _by_master, fetched in found.values()):
        raise NotAuthorized(f"SAE {slave_id} is not a slave SAE of one or more requested keys")
    if len(found) != len(key_ids) or any(fetched or not by_master for by_master, fetched in found.values()):
        raise KeysNotFound()


def total_entropy() -> float:
    """Shannon entropy, in bits per byte, of all key material the KME holds."""
    return entropy.of_histograms(common.link_histograms())
