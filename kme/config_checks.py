"""The configuration's cross-field rules: routes, IDs, serials, key folders, foreign KMSs.

kme.config builds the frozen dataclasses (ThisKme, OtherKme, Sae, ForeignKms)
and calls these once every field has its shape; each refusal is a
ConfigError naming the field.
"""
from kme import ids
from kme.errors import ConfigError
from kme.ids import Id


def routes(items: list[dict], this_kme_id: Id, neighbours: set[Id]) -> dict[Id, Id]:
    """``routes`` as destination -> next hop, each checked: a next hop must be a neighbour, and no route may
    lead back here (to this KME, or round through a neighbour to itself)."""
    found: dict[Id, Id] = {}
    for index, item in enumerate(items):
        where, destination, via = f"routes[{index}]", item["kme_id"], item["via"]
        if destination == this_kme_id:
            raise ConfigError(f"{where}.kme_id: KME {destination} is this KME: a route to itself is a loop")
        if destination in neighbours:
            raise ConfigError(f"{where}.kme_id: KME {destination} is linked to this KME (other_kmes): keys go "
                              "there directly, a route would send them round a loop")
        if destination in found:
            raise ConfigError(f"{where}.kme_id: a second route to KME {destination}")
        if via == this_kme_id:
            raise ConfigError(f"{where}.via: KME {via} is this KME: the route would loop here")
        if via not in neighbours:
            raise ConfigError(f"{where}.via: KME {via} is not linked to this KME (the next hop must be one of "
                              "other_kmes)")
        found[destination] = via
    return found


def check_ids(this_kme, other_kmes: tuple, saes: tuple, routed: set[Id], foreign: set[Id]) -> None:
    """IDs unique among KMEs and among SAEs, each SAE's KME (or foreign KMS) known, serials where they are needed
    and unique, one key folder per link, no two IDs stored as one number."""
    kme_ids = {this_kme.id}
    peer_serials = set()
    for index, peer in enumerate(other_kmes):
        if peer.id in kme_ids:
            raise ConfigError(f"other_kmes[{index}].id: duplicate KME ID {peer.id}")
        kme_ids.add(peer.id)
        serial = peer.https_client_certificate_serial
        if serial is None and len(other_kmes) > 1:
            raise ConfigError(f"other_kmes[{index}].https_client_certificate_serial: missing "
                              "(required when there is more than one other KME)")
        if serial is not None and serial in peer_serials:
            raise ConfigError(f"other_kmes[{index}].https_client_certificate_serial: duplicate serial")
        peer_serials.add(serial)
    sae_ids, serials = set(), set()
    for index, sae in enumerate(saes):
        if sae.id in sae_ids:
            raise ConfigError(f"saes[{index}].id: duplicate SAE ID {sae.id}")
        sae_ids.add(sae.id)
        if sae.kme_id not in kme_ids | routed | foreign:
            raise ConfigError(f"saes[{index}].kme_id: unknown KME {sae.kme_id} (neither this_kme, nor other_kmes, "
                              "nor a destination of routes, nor foreign_kms)")
        if sae.certificate_serial is not None:
            if sae.kme_id != this_kme.id:
                raise ConfigError(
                    f"saes[{index}].https_client_certificate_serial: only for SAEs of this KME (kme_id {this_kme.id})"
                )
            if sae.certificate_serial in serials:
                raise ConfigError(f"saes[{index}].https_client_certificate_serial: duplicate serial")
            serials.add(sae.certificate_serial)
    check_numbers("KME", [("this_kme.id", this_kme.id)]
                   + [(f"other_kmes[{index}].id", peer.id) for index, peer in enumerate(other_kmes)])
    check_numbers("SAE", [(f"saes[{index}].id", sae.id) for index, sae in enumerate(saes)])
    directories = [this_kme.key_directory_to_watch] + [peer.key_directory_to_watch for peer in other_kmes]
    if len(set(directories)) != len(directories):
        raise ConfigError("other_kmes: two links share one key_directory_to_watch")


def check_foreign(foreign: tuple, kme_ids: set) -> None:
    """A foreign KMS is named apart from every KME, and known by a serial of its own."""
    ids_seen, serials = set(), set()
    for index, entry in enumerate(foreign):
        if entry.id in kme_ids or entry.id in ids_seen:
            raise ConfigError(f"foreign_kms[{index}].id: {entry.id} names a KME or another foreign KMS already")
        if entry.https_client_certificate_serial in serials:
            raise ConfigError(f"foreign_kms[{index}].https_client_certificate_serial: duplicate serial")
        ids_seen.add(entry.id)
        serials.add(entry.https_client_certificate_serial)


def check_foreign_targets(foreign: tuple, saes: tuple) -> None:
    """What a foreign KMS may deliver to: SAEs of our network (configured, not behind a foreign KMS)."""
    by_id = {sae.id: sae for sae in saes}
    foreign_ids = {entry.id for entry in foreign}
    for index, entry in enumerate(foreign):
        for target in entry.target_sae_ids:
            sae = by_id.get(target)
            if sae is None or sae.kme_id in foreign_ids:
                raise ConfigError(f"foreign_kms[{index}].target_sae_ids: {target} is not an SAE of this KME's "
                                  "network (saes[], not behind a foreign KMS)")


def check_numbers(kind: str, named: list[tuple[str, Id]]) -> None:
    """Refuse two IDs that the database would store as one number (two strings whose digests meet: never seen,
    but a key must never reach the wrong SAE or link because of it)."""
    seen: dict[int, Id] = {}
    for where, value in named:
        stored = ids.number(value)
        if stored in seen and seen[stored] != value:
            raise ConfigError(f"{where}: {kind} ID {value} and {kind} ID {seen[stored]} are stored as one number; "
                              "rename one")
        seen[stored] = value
