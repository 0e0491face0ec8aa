"""Key-encryption keys (KEK): opening the source a configuration names, and wrapping the data key under it.

The KEK never touches the database: it wraps (AES-256-GCM) the one random
data-encryption key of a database, which kme.storage.sealing uses for the
rows. A file or systemd credential KEK is read into memory; a PKCS#11 KEK
stays on its token, which does the wrapping itself. Every failure is a
KekError with one line for the operator, never the key.
"""
import binascii
import os
import secrets
import threading
import time
from pathlib import Path

import pkcs11
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pkcs11 import KeyType, Mechanism, ObjectClass
from pkcs11.mechanisms import GCMParams

from kme import database_uris
from kme.config import KekSource
from kme.storage import backends
from kme.storage.meta_names import DATA_KEY, DATA_KEY_PREVIOUS, DATABASE_ID

KEK_BYTES = 32
# After flask rotate-kek, how long processes still configured with the previous KEK keep working.
ROTATION_GRACE_SECONDS = 3600
_NONCE_BYTES = 12
_WRAP_VERSION = b"\x01"
# Readings of a PKCS#11 module's slots before a token counts as missing, and tries of a call on the token before
# its failure counts: 0.05 s between the first two, twice as long each time up to 0.4 s, 2.75 s in all (under load
# on two cores a token other processes were logging in to was missing from four readings 0.7 s apart). A decrypt
# whose tag does not verify fails every try, so a wrong key is named that much later (the token is used at start
# and when the data key is wrapped again, never per request).
TOKEN_LOOKUPS = 10
TOKEN_CALLS = 10


# A module's view of its tokens is read afresh after a failure (finalized and initialized again), which must not
# happen under a session of another thread: one turn for every use of PKCS#11 in the process.
_PKCS11_TURN = threading.Lock()


def _pause(attempt: int) -> None:
    time.sleep(min(0.05 * 2 ** attempt, 0.4))


class KekError(Exception):
    """The KEK cannot be opened, or does not open a database's data key; the message is one line."""


class Kek:
    """An opened key-encryption key: wrap and unwrap the data key of a database."""

    def __init__(self, source: KekSource, encrypt, decrypt):
        self.source = source
        self._encrypt = encrypt
        self._decrypt = decrypt

    def wrap(self, data_key: bytes, context: bytes) -> bytes:
        """The data key encrypted and authenticated under this KEK, bound to ``context`` (the database's ID)."""
        nonce = os.urandom(_NONCE_BYTES)
        return _WRAP_VERSION + nonce + self._encrypt(nonce, data_key, context)

    def unwrap(self, wrapped: bytes, context: bytes) -> bytes:
        """The data key; KekError if this KEK did not wrap it for ``context`` (another KEK, another database)."""
        if wrapped[:1] != _WRAP_VERSION or len(wrapped) < 1 + _NONCE_BYTES + 16:
            raise KekError("the database's data key is not in a format this KME knows")
        nonce, sealed = wrapped[1:1 + _NONCE_BYTES], wrapped[1 + _NONCE_BYTES:]
        try:
            return self._decrypt(nonce, sealed, context)
        except InvalidTag:
            raise KekError(f"the key-encryption key ({self.source.describe()}) does not open this database's data key: "
                           "it is not the key the database was written under") from None


def open_kek(source: KekSource) -> tuple[Kek, bool]:
    """The KEK of ``source``, and whether it was created just now (a generated file, first start)."""
    if source.kind == "ephemeral":
        return _software(source, secrets.token_bytes(KEK_BYTES)), False
    if source.kind == "pkcs11":
        return _pkcs11(source), False
    created = False
    if source.kind == "generated":
        created = _generate(source.path)
        path = source.path
    elif source.kind == "credential":
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            raise KekError(f"this_kme.key_encryption_key names the systemd credential {source.name}, but "
                           "CREDENTIALS_DIRECTORY is not set (run under systemd with LoadCredential=)")
        path = Path(directory) / source.name
    else:
        path = source.path
    return _software(source, read_key_file(path)), created


def open_at_start(config, warn, check: bool = True) -> Kek:
    """Open the configured KEK and (``check``) check that it opens the database's data key; KekError (one line)
    if not.

    Every serving process runs this at start, so a missing or wrong KEK
    stops it before it serves; the flask commands check when they open the
    database (flask rotate-kek must run while the configured KEK is the old
    one). ``warn(line)`` is told where a KEK file generated just now lies.
    """
    source = config.this_kme.key_encryption_key
    uri = config.this_kme.database_uri
    backend = backends.for_uri(uri)
    if source.kind == "generated" and not source.path.exists() and DATA_KEY in backend.read_meta(uri):
        # A fresh key would never open this database: the file was lost or moved, and is what is needed.
        raise KekError(f"the key-encryption key file {source.path} does not exist, and the database "
                       f"{database_uris.describe(uri)} was written under one: restore the file, or name where it is in "
                       "this_kme.key_encryption_key")
    kek, created = open_kek(source)
    if created:
        warn(f"generated the key-encryption key file {source.path} (readable by its owner only): it protects "
             "every key in the database, so keep it on other storage than the database and its backups, and name "
             "it in this_kme.key_encryption_key (docs/security.md)")
    if check:
        check_database(uri, kek)
    return kek


def check_database(uri: str, kek: Kek) -> bool:
    """KekError unless ``kek`` opens the data key of the database at ``uri`` (or, during a rotation, its previous
    wrap); False if there is none to open (no database, or no data key yet)."""
    facts = backends.for_uri(uri).read_meta(uri)
    if DATA_KEY not in facts or DATABASE_ID not in facts:
        return False
    unwrap(kek, facts)
    return True


def unwrap(kek: Kek, facts: dict[str, bytes]) -> bytes:
    """The data key of the database whose kme_meta rows are ``facts``: unwrapped by ``kek``, or, while a rotation
    is under way (flask rotate-kek, for ROTATION_GRACE_SECONDS), by the previous KEK; KekError otherwise."""
    bound = context(facts[DATABASE_ID])
    previous = facts.get(DATA_KEY_PREVIOUS)
    try:
        return kek.unwrap(facts[DATA_KEY], bound)
    except KekError:
        if previous is None or rotation_over(previous):
            raise
        try:
            return kek.unwrap(previous[8:], bound)
        except KekError:
            pass
        # Neither wrap opens: said of the current one.
        raise


def rotation_over(previous: bytes) -> bool:
    """Whether the previous wrap kept by a rotation (its expiry, then the wrap) has expired."""
    return int.from_bytes(previous[:8], "big") < time.time()


def context(database_id: bytes) -> bytes:
    """What a wrapped data key is bound to: its database."""
    return b"kme data key\0" + database_id


def read_key_file(path: Path) -> bytes:
    """A KEK file: 32 bytes, or 64 hexadecimal digits (and a newline); refused unless only its owner may read it."""
    try:
        status = os.stat(path)
        content = path.read_bytes()
    except FileNotFoundError:
        raise KekError(f"the key-encryption key file {path} does not exist") from None
    except OSError as exc:
        raise KekError(f"the key-encryption key file {path} cannot be read ({exc.strerror})") from None
    if status.st_mode & 0o077:
        raise KekError(f"the key-encryption key file {path} may be read by others (mode {status.st_mode & 0o777:o}); "
                       "chmod 600 it (or 400)")
    if len(content) == KEK_BYTES:
        return content
    try:
        key = binascii.unhexlify(content.strip())
    except (binascii.Error, ValueError):
        key = b""
    if len(key) != KEK_BYTES:
        raise KekError(f"the key-encryption key file {path} holds neither 32 bytes nor 64 hexadecimal digits")
    return key


def write_key_file(path: Path) -> bool:
    """Create a KEK file with a fresh random key, owner-only; False (and nothing changed) if the path exists.

    Written under a temporary name then linked into place, so a process
    starting at the same moment reads either no file or the whole key.
    """
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(secrets.token_hex(KEK_BYTES) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(temporary, path)
        except FileExistsError:
            return False
        return True
    finally:
        temporary.unlink()


def _generate(path: Path) -> bool:
    if path.exists():
        return False
    try:
        return write_key_file(path)
    except OSError as exc:
        raise KekError(f"cannot create the key-encryption key file {path} ({exc.strerror}); create it "
                       "(docs/security.md) or name one in this_kme.key_encryption_key") from None


def _software(source: KekSource, key: bytes) -> Kek:
    cipher = AESGCM(key)
    return Kek(source, cipher.encrypt, cipher.decrypt)


def _token(library, source: KekSource):
    """The token labelled as ``source`` says; NoSuchToken once TOKEN_LOOKUPS readings of the slots lack it.

    A token another process is updating can be missing from one reading, or
    fail it (SoftHSM2 rewrites its token file at each login: two workers
    starting together saw both), so the module reads its slots again before
    the KME gives up.
    """
    for attempt in range(TOKEN_LOOKUPS):
        try:
            return library.get_token(token_label=source.token)
        except pkcs11.PKCS11Error:
            if attempt == TOKEN_LOOKUPS - 1:
                raise
            _pause(attempt)
            library.reinitialize()


def _pkcs11(source: KekSource) -> Kek:
    """A KEK that stays on a PKCS#11 token: each wrap or unwrap opens a session, logs in and runs AES-GCM there."""
    pin = source.pin_value
    if source.pin_source is not None:
        try:
            status = os.stat(source.pin_source)
            pin = source.pin_source.read_text().strip()
        except OSError as exc:
            raise KekError(f"the PIN file {source.pin_source} cannot be read ({exc.strerror})") from None
        if status.st_mode & 0o077:
            raise KekError(f"the PIN file {source.pin_source} may be read by others (mode {status.st_mode & 0o777:o}); "
                           "chmod 600 it (or 400)")
    library = pkcs11.lib(source.module)
    try:
        with _PKCS11_TURN:
            token = [_token(library, source)]
    except pkcs11.NoSuchToken:
        raise KekError(f"no PKCS#11 token labelled {source.token!r} (module {source.module})") from None
    except (pkcs11.PKCS11Error, RuntimeError, OSError) as exc:
        raise KekError(f"the PKCS#11 module {source.module} cannot be used ({exc.__class__.__name__})") from None

    def once(operation: str, nonce: bytes, data: bytes, context: bytes) -> bytes:
        if token[0] is None:
            token[0] = library.get_token(token_label=source.token)
        with token[0].open(user_pin=pin or None) as session:
            key = session.get_key(label=source.name, key_type=KeyType.AES, object_class=ObjectClass.SECRET_KEY)
            return getattr(key, operation)(data, mechanism=Mechanism.AES_GCM,
                                           mechanism_param=GCMParams(nonce, context, 128))

    def on_token(operation: str, nonce: bytes, data: bytes, context: bytes) -> bytes:
        # SoftHSM2 rewrites its token file at each login: a process that read it half written keeps a wrong view
        # of the token (GeneralError, UserPinNotInitialized at every try) until the module reads its slots again,
        # so a failed call is made again on the token as read afresh before the failure counts.
        with _PKCS11_TURN:
            for attempt in range(TOKEN_CALLS):
                try:
                    return once(operation, nonce, data, context)
                except (pkcs11.PinIncorrect, pkcs11.NoSuchKey):
                    raise
                except pkcs11.PKCS11Error:
                    if attempt == TOKEN_CALLS - 1:
                        raise
                    _pause(attempt)
                    library.reinitialize()
                    token[0] = None

    def token_works() -> bool:
        nonce = os.urandom(_NONCE_BYTES)
        try:
            return on_token("decrypt", nonce, on_token("encrypt", nonce, b"probe", b"probe"), b"probe") == b"probe"
        except pkcs11.PKCS11Error:
            return False

    def run(operation: str):
        def call(nonce: bytes, data: bytes, context: bytes) -> bytes:
            try:
                return on_token(operation, nonce, data, context)
            except pkcs11.PinIncorrect:
                raise KekError(f"the PKCS#11 token {source.token!r} refused the PIN") from None
            except pkcs11.NoSuchKey:
                raise KekError(f"no AES key labelled {source.name!r} on the PKCS#11 token {source.token!r}") from None
            except pkcs11.PKCS11Error as exc:
                # Tokens report a GCM tag that does not verify as a generic failure (SoftHSM2: GeneralError),
                # like a failure of their own: a round trip that works says which it was.
                if operation == "decrypt" and token_works():
                    raise InvalidTag() from None
                raise KekError(f"the PKCS#11 token {source.token!r} failed ({exc.__class__.__name__}): is it present "
                               "and working?") from None
        return call

    kek = Kek(source, run("encrypt"), run("decrypt"))
    # Open a session now: a wrong PIN or a missing key stops the process at start, not at first use.
    kek.unwrap(kek.wrap(b"\0" * KEK_BYTES, b"probe"), b"probe")
    return kek
