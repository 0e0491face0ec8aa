"""Key material at rest: every stored key sealed with AES-256-GCM under the database's data key.

A sealed value is ``salt (16) || counter (8) || ciphertext || tag (16)``.
Each process, the first time it seals, draws a random 128-bit salt and
derives its own subkey, HKDF-SHA256(data key, salt); its nonces are a
counter under that subkey, so no nonce ever repeats under a key: within a
process the counter only grows, and two processes (or one restarted) have
different subkeys unless two random 128-bit salts collide. A database
restored from a backup cannot make a process reuse a nonce either, since no
nonce state is kept in the database. The associated data is the value's
place, so a value copied to another row does not open:

- a pool key: its link, position and key file name (the name peers use for it: a name swapped between two
  rows of key_files makes their keys refuse to open);
- a delivered key: its key ID, link, master SAE and the sorted IDs of the slave SAEs that may fetch it (a
  slave added to key_slaves outside the KME makes it refuse to open; a release that lets the slaves of a
  held relay fetch seals it again for them);
- a link's byte histogram (which tells the byte frequencies of the keys held): its link;
- the secret that keys the fingerprints of every key ever ingested (whoever has it can test guessed keys
  against them): its name.

IDs of SAEs and links are bound as the database stores them (kme.ids.number): an integer ID as itself, so
that keys sealed before string IDs existed still open.

Values that do not open raise StorageFailure naming the place: the
database was altered outside the KME, and the transaction that read them
changes nothing.
"""
import itertools
import os
import struct
import threading

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kme.errors import StorageFailure
from kme.ids import number

SALT_BYTES = 16
COUNTER_BYTES = 8
TAG_BYTES = 16
OVERHEAD = SALT_BYTES + COUNTER_BYTES + TAG_BYTES
_NONCE_PAD = bytes(12 - COUNTER_BYTES)
_INFO = b"kme key material at rest v1"
_POOL = struct.Struct(">cqq")
_DELIVERED = struct.Struct(">cqqH")
# Subkeys of other processes kept for opening; a KME sees a few per restart of a process.
_OPENERS_KEPT = 4096


class Sealer:
    """Seals and opens the key material of one database with its data key; safe across threads, not forks."""

    def __init__(self, data_key: bytes):
        self._data_key = data_key
        self._lock = threading.Lock()
        self._session: tuple[int, bytes, object, itertools.count] | None = None
        self._openers: dict[bytes, object] = {}

    def _subkey(self, salt: bytes):
        return AESGCM(HKDF(hashes.SHA256(), 32, salt, _INFO).derive(self._data_key))

    def _counters(self, count: int) -> tuple[bytes, object, int]:
        """(salt, subkey, first counter) for ``count`` new nonces of this process."""
        with self._lock:
            # A forked child must not reuse its parent's subkey and counter.
            if self._session is None or self._session[0] != os.getpid():
                salt = os.urandom(SALT_BYTES)
                self._session = (os.getpid(), salt, self._subkey(salt), 0)
            pid, salt, cipher, first = self._session
            self._session = (pid, salt, cipher, first + count)
        return salt, cipher, first

    def _opener(self, salt: bytes):
        cipher = self._openers.get(salt)
        if cipher is None:
            if len(self._openers) >= _OPENERS_KEPT:
                self._openers.clear()
            cipher = self._openers[salt] = self._subkey(salt)
        return cipher

    def seal(self, values: list[bytes], places: list[bytes]) -> list[bytes]:
        """Each value sealed for its place (see the place functions below)."""
        salt, cipher, first = self._counters(len(values))
        encrypt = cipher.encrypt
        sealed = []
        for counter, value, place in zip(itertools.count(first), values, places):
            stamp = counter.to_bytes(COUNTER_BYTES, "big")
            sealed.append(salt + stamp + encrypt(_NONCE_PAD + stamp, value, place))
        return sealed

    def seal_pool(self, link_id: int, file_name: str, positions, values: list[bytes]) -> list[bytes]:
        """Keys of one key file, for ingestion (the places built here: a million keys a file is common)."""
        salt, cipher, first = self._counters(len(values))
        encrypt = cipher.encrypt
        head, name = _POOL.pack(b"N", number(link_id), 0)[:9], file_name.encode()
        return [salt + (stamp := counter.to_bytes(COUNTER_BYTES, "big"))
                + encrypt(_NONCE_PAD + stamp, value, head + position.to_bytes(8, "big", signed=True) + name)
                for counter, position, value in zip(itertools.count(first), positions, values)]

    def seal_delivered(self, link_id: int, master_sae_id: int, slave_ids, keys) -> list[bytes]:
        """Delivered keys (key_id, material) of one link, master and slaves (the places built here: 128 a
        request)."""
        salt, cipher, first = self._counters(len(keys))
        encrypt = cipher.encrypt
        slaves = _slaves(slave_ids)
        return [salt + (stamp := counter.to_bytes(COUNTER_BYTES, "big"))
                + encrypt(_NONCE_PAD + stamp, key.material, _delivered_head(key.key_id, link_id, master_sae_id)
                          + slaves)
                for counter, key in zip(itertools.count(first), keys)]

    def open_pool(self, link_id: int, rows, names: dict[int, str]) -> list[bytes]:
        """Sealed pool keys of one link given as (file_id, position, sealed) rows, in their order; ``names``: the
        name of each file by ID, as the caller's transaction reads it.

        The SAE hot path: places built inline, one subkey lookup a row; a
        value that does not open is then found again by ``open``, which
        names it.
        """
        pack, openers, opened, link_number = _POOL.pack, self._openers, [], number(link_id)
        encoded = {file_id: name.encode() for file_id, name in names.items()}
        try:
            for file_id, position, sealed in rows:
                salt = sealed[:SALT_BYTES]
                cipher = openers.get(salt) or self._opener(salt)
                opened.append(cipher.decrypt(_NONCE_PAD + sealed[SALT_BYTES:SALT_BYTES + COUNTER_BYTES],
                                             sealed[SALT_BYTES + COUNTER_BYTES:],
                                             pack(b"N", link_number, position) + encoded[file_id]))
        except (InvalidTag, ValueError):
            file_id, position, sealed = rows[len(opened)]
            self.open(sealed, pool_place(link_id, names[file_id], position),
                      lambda: f"pool key {position} of key file {names[file_id]} on link {link_id}")
            raise
        return opened

    def open(self, sealed: bytes, place: bytes, where) -> bytes:
        """The value sealed for ``place``; StorageFailure naming ``where()`` if it does not open there."""
        if len(sealed) < OVERHEAD:
            raise StorageFailure(f"{where()} is stored truncated: the database was altered outside the KME")
        salt, stamp = sealed[:SALT_BYTES], sealed[SALT_BYTES:SALT_BYTES + COUNTER_BYTES]
        try:
            return self._opener(salt).decrypt(_NONCE_PAD + stamp, sealed[SALT_BYTES + COUNTER_BYTES:], place)
        except InvalidTag:
            raise StorageFailure(f"{where()} does not open under this database's data key (moved, altered or "
                                 "truncated outside the KME)") from None


def pool_place(link_id: int, file_name: str, position: int) -> bytes:
    """The associated data of a pool key."""
    return _POOL.pack(b"N", number(link_id), position) + file_name.encode()


def delivered_place(key_id: str, link_id: int, master_sae_id: int, slave_ids) -> bytes:
    """The associated data of a delivered key."""
    return _delivered_head(key_id, link_id, master_sae_id) + _slaves(slave_ids)


def _delivered_head(key_id: str, link_id: int, master_sae_id: int) -> bytes:
    encoded = key_id.encode()
    return _DELIVERED.pack(b"E", number(link_id), number(master_sae_id), len(encoded)) + encoded


def _slaves(slave_ids) -> bytes:
    ordered = sorted({number(slave) for slave in slave_ids})
    return len(ordered).to_bytes(2, "big") + b"".join(slave.to_bytes(8, "big", signed=True) for slave in ordered)


def secret_place() -> bytes:
    """The associated data of the fingerprint secret."""
    return b"F fingerprint secret"


def histogram_place(link_id: int) -> bytes:
    """The associated data of a link's byte histogram."""
    return b"H" + number(link_id).to_bytes(8, "big", signed=True)
