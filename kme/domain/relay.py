"""Relays through trusted nodes: keys for slave SAEs behind KMEs this KME has no link with, or behind several KMEs
(docs/inter-kme-protocol.md, "Relay").

The KME of the master takes the key from its link with the first next hop;
every KME on the way passes it on sealed with a one-time pad of its next
link, each message authenticated by a one-time MAC keyed with that link's
key material (kme.key_math.one_time). A hop answers only once every hop after
it committed, so the master gets the key only once every destination holds
it. Any failure answers 503 naming the hop where it happened; keys that
left a KME on a hop are cancelled at both ends of it, never used again.
A node sends its next hops their messages at once, in parallel, and every
wait of one relay at a node (leases, connections, answers) ends by one
deadline, so the background never takes a live relay for abandoned.
"""
import base64
import json
import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from kme import ids
from kme.config import KmeConfig, OtherKme, Sae
from kme.domain.sharing import reserve_borrowing
from kme.errors import (
    BadRequest,
    Forbidden,
    NotEnoughKeys,
    PeerError,
    PeerFailure,
    PeerOutcomeUnknown,
    PeerRefused,
    PeerUnreachable,
    RelayFailure,
)
from kme.key_math import one_time
from kme.operations import metrics
from kme.peers.client import client_for
from kme.storage.keystore import relays
from kme.storage.keystore.common import DeliveredKeyMaterial, build_keys, new_key_id, new_key_ids, pool_keys_per_key
from kme.storage.keystore.relays import Branch, Message, Node

log = logging.getLogger(__name__)

# Of the time the KME before waits, the share a node gives its next hops (the rest is its own work and answer).
ONWARD_SHARE = 0.8


def _by_kme(by_kme: dict) -> list[tuple]:
    """The items of a dict keyed by KME ID in the order of the IDs (kme.ids.order): the same at every node."""
    return sorted(by_kme.items(), key=lambda item: ids.order(item[0]))


def peer_wait(peers: Iterable[OtherKme]) -> float:
    """The longest a request waits for ``peers``, all its calls together: the longest connect + read timeout."""
    return max((peer.connect_timeout_seconds + peer.read_timeout_seconds for peer in peers), default=0)


def send(config: KmeConfig, master: Sae, slaves_by_kme: dict[int, list[int]], local_slaves: list[int], number: int,
         size_bits: int) -> list[DeliveredKeyMaterial]:
    """Keys for ``master`` and slaves behind other KMEs (by KME), relayed where there is no link: answered only
    once every destination committed them (and, for several destinations, the relay is decided for all)."""
    # The key itself comes from the link of the first next hop; the other hops get it under a pad.
    return _start(config, master, slaves_by_kme, local_slaves, number * pool_keys_per_key(size_bits) + 1,
                  lambda branches: build_keys(new_key_ids(number), branches[0].materials[:-1], size_bits), None, None)


def forward(config: KmeConfig, master: Sae, slaves_by_kme: dict[int, list[int]], local_slaves: list[int],
            keys: list[DeliveredKeyMaterial], link_id, settle: Callable) -> None:
    """Keys that came from outside our links (a foreign KMS's, kme.domain.interop) for slaves behind other KMEs
    and ``local_slaves`` here (kept on ``link_id``): sealed with a one-time pad on every hop, the first one too.
    Returns once every destination committed them; ``settle(connection)`` runs in the transaction that commits
    this KME's part. RelayFailure as for send."""
    count = len(keys) * pool_keys_per_key(len(keys[0].material) * 8) + 1
    _start(config, master, slaves_by_kme, local_slaves, count, lambda _branches: keys, link_id, settle)


def _start(config: KmeConfig, master: Sae, slaves_by_kme: dict[int, list[int]], local_slaves: list[int],
           count: int, keys_of: Callable[[list[Branch]], list[DeliveredKeyMaterial]], local_link,
           settle: Callable | None) -> list[DeliveredKeyMaterial]:
    """Start a relay at this KME: reserve ``count`` keys of each next hop's link, pass ``keys_of(branches)`` on
    (kept here on ``local_link``, or, when None, on the first hop's link, whose own keys they are); the keys."""
    this = config.this_kme.id
    plan = _plan(config, slaves_by_kme, [this])
    deadline = time.monotonic() + peer_wait(config.other_kmes_by_id[hop] for hop in plan)
    relay_id = new_key_id()
    branches = _reserve(config, relay_id, {hop: count for hop in plan}, deadline)
    keys = keys_of(branches)
    slave_ids = local_slaves + [slave for _kme, slaves in _by_kme(slaves_by_kme) for slave in slaves]
    node = Node(relay_id, master.id, slave_ids, None, branches,
                branches[0].link_id if local_link is None else local_link, local_slaves, len(slaves_by_kme) > 1)
    _pass_on(config, node, keys, plan, [this], deadline, local_link is None, settle)
    if node.hold:
        send_releases(config, [(branch.activation_id, branch.link_id, branch.cancel_body()) for branch in branches])
    return keys


def accept(config: KmeConfig, caller: OtherKme, message: Message, body: bytes, mac: bytes) -> int:
    """Take a relay from the neighbour ``caller``: keep its keys for our slaves, pass it on to the next hops, and
    answer (the number of keys) once every hop after us committed."""
    started = time.monotonic()
    this = config.this_kme.id
    _check(config, caller, message)
    local = message.targets.get(this, [])
    plan = _plan(config, {kme: slaves for kme, slaves in message.targets.items() if kme != this},
                 message.path + [this])
    # Never longer than we would wait ourselves: the background takes a relay older than that for abandoned.
    deadline = started + min(message.timeout_seconds * ONWARD_SHARE,
                             peer_wait(config.other_kmes_by_id[hop] for hop in plan))
    onward = {hop: new_key_id() for hop in plan}
    received = relays.receive(this, caller.id, message, lambda mac_key: one_time.verify(mac_key, body, mac), local,
                              onward)
    if received is None:
        raise BadRequest("the relay message fails its integrity check (one-time MAC)")
    if received.finished is not None:
        return received.finished
    slave_ids = [slave for _kme, slaves in _by_kme(message.targets) for slave in slaves]
    incoming = (caller.id, message.activation_id)
    try:
        branches = _reserve(config, message.relay_id, {hop: len(message.parts) for hop in plan}, deadline, onward)
    except RelayFailure as failure:
        relays.fail(Node(message.relay_id, message.master_sae_id, slave_ids, incoming, [], caller.id, local,
                         message.hold), [], [], str(failure))
        raise
    node = Node(message.relay_id, message.master_sae_id, slave_ids, incoming, branches, caller.id, local,
                message.hold)
    _pass_on(config, node, received.keys, plan, message.path + [this], deadline, False, None)
    return len(received.keys)


def _check(config: KmeConfig, caller: OtherKme, message: Message) -> None:
    """The caller acts within its rights: it is the path's last KME, the origin is a KME we know; our slaves are
    ours, the master is the origin's; the keys fit our limits. Nothing has changed when this refuses."""
    this = config.this_kme.id
    if message.path[-1] != caller.id:
        raise Forbidden(f"the relay's path does not end at the calling KME {caller.id}")
    if this in message.path:
        raise BadRequest(f"the relay's path {message.path} already passed through this KME")
    origin = message.path[0]
    # Loose: static routes may differ by direction (a ring), so the way back need not be the way in.
    if config.next_hop(origin) is None:
        raise Forbidden(f"KME {origin}, where the relay starts, is unknown to this KME (neither linked nor routed)")
    refusal = config.this_kme.limits.refusal(message.size_bits, len(message.keys), "relay")
    if refusal:
        raise BadRequest(refusal)
    check_parts(message.size_bits, [parts for _, parts, _ in message.keys])
    if len({sealed is None for _, _, sealed in message.keys}) != 1 or any(
            sealed is not None and len(sealed) != message.size_bits // 8 for _, _, sealed in message.keys):
        raise BadRequest(f"sealed: every key or none, each of {message.size_bits // 8} bytes")
    local = message.targets.get(this, [])
    foreign = foreign_slave(config, local, "relay")
    if foreign is not None and (len(message.targets) > 1 or message.hold):
        raise Forbidden(f"SAE {foreign.id} is behind a foreign KMS: it is the only slave of its relay")
    for slave_id in local:
        slave = config.saes_by_id.get(slave_id)
        if foreign is None and (slave is None or slave.kme_id != this):
            raise Forbidden(f"SAE {slave_id} is not an SAE of this KME")
    master = config.saes_by_id.get(message.master_sae_id)
    if local and (master is None or master.kme_id != origin):
        raise Forbidden(f"SAE {message.master_sae_id} is not an SAE of KME {origin}")


def foreign_slave(config: KmeConfig, slave_ids: list, what: str) -> Sae | None:
    """The slave SAE if ``slave_ids`` name one behind a foreign KMS of this KME (kme.domain.interop passes it its
    keys), else None; Forbidden if such an SAE is one of several slaves of the ``what`` (activation, relay)."""
    behind = [sae for sae in map(config.saes_by_id.get, slave_ids)
              if sae is not None and sae.kme_id in config.foreign_kms_by_id]
    if behind and len(slave_ids) > 1:
        raise Forbidden(f"SAE {behind[0].id} is behind a foreign KMS: it is the only slave of its {what}")
    return behind[0] if behind else None


def check_parts(size_bits: int, parts_of_keys: list[list]) -> None:
    """Each key names as many pool keys as its size needs (an activation's or a relay's); BadRequest if not."""
    per_key = pool_keys_per_key(size_bits)
    if any(len(parts) != per_key for parts in parts_of_keys):
        raise BadRequest(f"each key of {size_bits} bits has {per_key} parts")


def _plan(config: KmeConfig, slaves_by_kme: dict[int, list[int]], path: list[int]) -> dict[int, dict[int, list[int]]]:
    """The destinations grouped by next hop: {neighbour: {destination KME: slave SAEs}}."""
    this = config.this_kme.id
    plan: dict[int, dict[int, list[int]]] = {}
    for kme_id, slaves in _by_kme(slaves_by_kme):
        hop = config.next_hop(kme_id)
        if hop is None:
            raise RelayFailure(this, kme_id, "no_route")
        if hop.id in path:
            raise RelayFailure(this, hop.id, "loop")
        plan.setdefault(hop.id, {})[kme_id] = slaves
    return plan


def _reserve(config: KmeConfig, relay_id: str, counts: dict[int, int], deadline: float,
             activation_ids: dict[int, str] | None = None) -> list[Branch]:
    """Reserve the keys of each next hop (borrowing by ``deadline`` from the neighbour's direction when ours is
    short); all or none."""
    branches: list[Branch] = []
    for hop, count in counts.items():
        peer = config.other_kmes_by_id[hop]
        activation_id = (activation_ids or {}).get(hop) or new_key_id()
        try:
            branches.append(reserve_borrowing(
                peer, lambda: relays.reserve_branch(hop, activation_id, count, relay_id), count, deadline))
        except (NotEnoughKeys, PeerFailure):
            relays.release_branches(branches)
            metrics.RELAY_FAILURES.labels(str(hop), "no_keys").inc()
            raise RelayFailure(config.this_kme.id, hop, "no_keys") from None
    return branches


def _body(node: Node, branch: Branch, keys: list[DeliveredKeyMaterial], targets: dict[int, list[int]],
          path: list[int], timeout: float, plain: bool, size_bits: int) -> bytes:
    """The relay message of one hop: the keys sealed with its pads (or, on the key's own link, only named)."""
    per_key = len(branch.parts[:-1]) // len(keys)
    wire_keys = []
    for index, key in enumerate(keys):
        parts = branch.parts[index * per_key:(index + 1) * per_key]
        entry = {"key_ID": key.key_id, "parts": [{"file": name, "position": position} for name, position in parts]}
        if not plain:
            pad = b"".join(branch.materials[index * per_key:(index + 1) * per_key])
            entry["sealed"] = base64.b64encode(one_time.xor(key.material, pad)).decode()
        wire_keys.append(entry)
    name, position = branch.parts[-1]
    return json.dumps({
        "activation_ID": branch.activation_id, "relay_ID": node.relay_id, "path": path,
        "master_SAE_ID": node.master_sae_id, "size": size_bits, "hold": node.hold,
        "timeout_ms": max(1, int(timeout * 1000)),
        "targets": [{"kme_ID": kme_id, "slave_SAE_IDs": slaves} for kme_id, slaves in _by_kme(targets)],
        "keys": wire_keys, "mac_part": {"file": name, "position": position},
    }, separators=(",", ":")).encode()


def _pass_on(config: KmeConfig, node: Node, keys: list[DeliveredKeyMaterial], plan: dict[int, dict[int, list[int]]],
             path: list[int], deadline: float, first_plain: bool, settle: Callable | None) -> None:
    """Send every next hop its message at once, then commit the relay here (with ``settle``), or fail it and raise
    the RelayFailure (of the first failing branch). ``first_plain``: the keys are the first branch's own key
    material, which that hop is only named."""
    size_bits = len(keys[0].material) * 8
    calls = []
    for branch in node.branches:
        peer = config.other_kmes_by_id[branch.link_id]
        left = min(peer.read_timeout_seconds, deadline - time.monotonic())
        plain = first_plain and branch is node.branches[0]
        body = _body(node, branch, keys, plan[peer.id], path, left, plain, size_bits) if left > 0 else None
        calls.append((peer, branch, body))
    this = config.this_kme.id
    if len(calls) == 1:
        outcomes = [_send(this, node, len(keys), deadline, *calls[0])]
    else:
        with ThreadPoolExecutor(len(calls), thread_name_prefix="relay") as pool:
            outcomes = list(pool.map(lambda call: _send(this, node, len(keys), deadline, *call), calls))
    fates: dict[str, list[Branch]] = {"sent": [], "unsent": [], "settle": []}
    for branch, (fate, _failure) in zip(node.branches, outcomes):
        fates[fate].append(branch)
    failure = next((failure for _fate, failure in outcomes if failure is not None), None)
    if failure is None:
        try:
            relays.complete(node, keys, settle)
            metrics.RELAYS.labels("passed_on" if node.incoming else "started").inc()
            return
        except PeerFailure:
            failure = RelayFailure(this, node.incoming[0] if node.incoming else this, "cancelled")
    metrics.RELAY_FAILURES.labels(str(failure.next_kme), failure.reason).inc()
    relays.fail(node, fates["unsent"], fates["settle"] + fates["sent"], str(failure))
    raise failure


def _send(this: int, node: Node, count: int, deadline: float, peer: OtherKme, branch: Branch,
          body: bytes | None) -> tuple[str, RelayFailure | None]:
    """One branch's call (no database here: it may run in a thread of its own): what became of its keys ("sent",
    "unsent", or "settle" when they may be at the peer without effect) and the failure, if any."""
    if body is None:
        return "unsent", RelayFailure(this, peer.id, "unknown")
    try:
        answer = client_for(peer).relay(branch.activation_id, body, one_time.tag(branch.materials[-1], body),
                                        deadline)
    except PeerUnreachable:
        return "unsent", RelayFailure(this, peer.id, "unreachable")
    except PeerRefused as exc:
        log.warning("relay %s to KME %s: %s: %s", node.relay_id, peer.id, exc, exc.detail)
        return "settle", _passed_back(exc.relay_failure) or RelayFailure(this, peer.id, "refused", exc.status)
    except PeerOutcomeUnknown as exc:
        log.warning("relay %s to KME %s: %s", node.relay_id, peer.id, exc)
        return "settle", RelayFailure(this, peer.id, "unknown")
    if answer.get("activated") != count:
        return "settle", RelayFailure(this, peer.id, "unknown")
    return "sent", None


def _passed_back(detail: dict | None) -> RelayFailure | None:
    """A failure further on, as the next hop reported it, if it has the shape of one of ours."""
    if not detail:
        return None
    at, next_kme, reason, status = (detail.get(name) for name in ("at_KME_ID", "next_KME_ID", "reason", "status"))
    if not (ids.is_id(at) and ids.is_id(next_kme) and reason in RelayFailure.REASONS
            and (status is None or isinstance(status, int))):
        return None
    return RelayFailure(at, next_kme, reason, status)


def cancel(config: KmeConfig, caller: OtherKme, activation_id: str, parts: list[tuple[str, int]]) -> None:
    """Make sure a relay hop of ``caller`` never takes effect here nor after (its next hops by the background)."""
    relays.cancel(config.this_kme.id, caller.id, activation_id, parts)


def release(config: KmeConfig, caller: OtherKme, activation_id: str) -> None:
    """A held multicast relay was decided: our slaves may fetch its keys, and the next hops hear it at once."""
    send_releases(config, relays.release(caller.id, activation_id))


def send_releases(config: KmeConfig, pending: list[tuple[str, int, dict]]) -> None:
    """Send releases to next hops; one that fails stays recorded for the background worker to send again."""
    for activation_id, stored_link, request in pending:
        link_id = config.kme_id(stored_link)
        peer = config.other_kmes_by_id.get(link_id)
        if peer is None:
            relays.released(activation_id, f"not sent: KME {link_id} left the configuration")
            continue
        try:
            client_for(peer).release_relay(request)
        except PeerRefused as exc:
            # The hop does not hold the relay (its database was replaced): asking again would change nothing.
            log.warning("release of relay activation %s refused by KME %s: %s", activation_id, link_id, exc.detail)
            relays.released(activation_id, f"refused by KME {link_id} (HTTP {exc.status})")
            continue
        except PeerError as exc:
            log.info("release of relay activation %s not sent yet: %s", activation_id, exc)
            continue
        relays.released(activation_id)

