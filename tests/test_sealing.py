"""Unit tests of kme.storage.sealing: AES-256-GCM per value, bound to its place, nonces that never repeat."""
import os

import pytest

from kme.errors import StorageFailure
from kme.storage import sealing
from kme.storage.sealing import OVERHEAD, SALT_BYTES, Sealer, delivered_place, histogram_place, pool_place

pytestmark = pytest.mark.engine_independent


@pytest.fixture
def sealer():
    return Sealer(os.urandom(32))


def where():
    return "the test value"


def test_a_sealed_pool_key_opens_at_its_place_only(sealer):
    key = os.urandom(32)
    (sealed,) = sealer.seal_pool(1, "a.cor", [3], [key])
    assert len(sealed) == 32 + OVERHEAD and key not in sealed
    assert sealer.open(sealed, pool_place(1, "a.cor", 3), where) == key
    # A file's name swapped with another's, or one byte longer, and the key does not open.
    for other in (pool_place(1, "a.cor", 4), pool_place(1, "b.cor", 3), pool_place(1, "a.cor2", 3),
                  pool_place(2, "a.cor", 3), delivered_place("x", 1, 7, [])):
        with pytest.raises(StorageFailure, match="does not open"):
            sealer.open(sealed, other, where)


def test_seal_pool_builds_the_same_places_as_pool_place(sealer):
    keys = [os.urandom(32) for _ in range(3)]
    sealed = sealer.seal_pool(2**40, "link-é.cor", [0, 1, 2**33], keys)
    assert [sealer.open(value, pool_place(2**40, "link-é.cor", position), where)
            for value, position in zip(sealed, [0, 1, 2**33])] == keys


def test_swapped_truncated_or_altered_values_are_refused(sealer):
    a, b = sealer.seal_pool(1, "f", [0, 1], [os.urandom(32), os.urandom(32)])
    with pytest.raises(StorageFailure, match="does not open"):
        sealer.open(b, pool_place(1, "f", 0), where)
    with pytest.raises(StorageFailure, match="does not open"):
        sealer.open(a[:-1], pool_place(1, "f", 0), where)
    with pytest.raises(StorageFailure, match="truncated"):
        sealer.open(a[:OVERHEAD - 1], pool_place(1, "f", 0), where)
    altered = bytearray(a)
    altered[SALT_BYTES + 9] ^= 1
    with pytest.raises(StorageFailure, match="the test value does not open"):
        sealer.open(bytes(altered), pool_place(1, "f", 0), where)


def test_another_data_key_opens_nothing(sealer):
    (sealed,) = sealer.seal([b"histogram"], [histogram_place(1)])
    with pytest.raises(StorageFailure):
        Sealer(os.urandom(32)).open(sealed, histogram_place(1), where)


def test_nonces_never_repeat_within_a_process_and_differ_after_a_fork(sealer, monkeypatch):
    values = [b"k" * 32] * 1000
    first = sealer.seal(values, [delivered_place("id", 1, 2, [3])] * 1000)
    second = sealer.seal_pool(1, "f", range(1000), values)
    stamps = {value[:SALT_BYTES + sealing.COUNTER_BYTES] for value in first + second}
    assert len(stamps) == 2000
    assert len({value[:SALT_BYTES] for value in first + second}) == 1
    # A forked child draws a fresh salt, so its subkey is not its parent's.
    monkeypatch.setattr(sealing.os, "getpid", lambda: -1)
    (child,) = sealer.seal([b"k" * 32], [delivered_place("id", 1, 2, [3])])
    assert child[:SALT_BYTES] != first[0][:SALT_BYTES]
    assert sealer.open(child, delivered_place("id", 1, 2, [3]), where) == b"k" * 32
    assert sealer.open(first[5], delivered_place("id", 1, 2, [3]), where) == b"k" * 32


def test_a_delivered_key_is_bound_to_its_id_link_master_and_slaves(sealer):
    (sealed,) = sealer.seal([b"\x01" * 64], [delivered_place("0190-a", 2, 9, [4, 3])])
    assert sealer.open(sealed, delivered_place("0190-a", 2, 9, [3, 4]), where) == b"\x01" * 64
    for other in (delivered_place("0190-b", 2, 9, [3, 4]), delivered_place("0190-a", 3, 9, [3, 4]),
                  delivered_place("0190-a", 2, 8, [3, 4]), delivered_place("0190-a", 2, 9, [3, 4, 5]),
                  delivered_place("0190-a", 2, 9, [3]), delivered_place("0190-a", 2, 9, [])):
        with pytest.raises(StorageFailure):
            sealer.open(sealed, other, where)


def test_open_pool_opens_a_request_of_rows_and_names_the_first_that_does_not_open(sealer):
    keys = [os.urandom(32) for _ in range(4)]
    sealed = sealer.seal_pool(3, "k.cor", range(4), keys)
    names = {9: "k.cor"}
    assert sealer.open_pool(3, [(9, position, value) for position, value in enumerate(sealed)], names) == keys
    swapped = [(9, 0, sealed[0]), (9, 1, sealed[1]), (9, 2, sealed[3]), (9, 3, sealed[2])]
    with pytest.raises(StorageFailure, match="pool key 2 of key file k.cor on link 3 does not open"):
        sealer.open_pool(3, swapped, names)
    with pytest.raises(StorageFailure, match="pool key 1 of key file k.cor on link 3 is stored truncated"):
        sealer.open_pool(3, [(9, 0, sealed[0]), (9, 1, sealed[1][:10])], names)
    with pytest.raises(StorageFailure, match="pool key 0 of key file j.cor on link 3 does not open"):
        sealer.open_pool(3, [(9, 0, sealed[0])], {9: "j.cor"})


def test_seal_delivered_builds_the_same_places_as_delivered_place(sealer):
    from kme.storage.keystore.common import DeliveredKeyMaterial

    keys = [DeliveredKeyMaterial(f"id-{n}", os.urandom(64)) for n in range(3)]
    sealed = sealer.seal_delivered(5, 7, [12, 11], keys)
    assert [sealer.open(value, delivered_place(key.key_id, 5, 7, [11, 12]), where)
            for value, key in zip(sealed, keys)] == \
        [key.material for key in keys]
