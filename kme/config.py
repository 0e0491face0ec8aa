"""The KME configuration: loaded from KME_CONFIG, validated field by field, frozen.

Every mistake raises ConfigError with one line naming the field, e.g.
``other_kmes[0].inter_kme_bind_address: missing``. The rest of the code only
sees the dataclasses below, never raw JSON. This module does not import Flask,
so the gunicorn configuration files can use it.
"""
import hashlib
import os
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import unquote

import json5
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12
from marshmallow import ValidationError

from kme import config_checks, database_uris, ids
from kme.config_schema import ConfigSchema, all_errors
from kme.database_uris import IN_MEMORY_URI
from kme.errors import ConfigError
from kme.ids import Id

KEY_BITS = 256
DEFAULT_KEY_EXPIRY_SECONDS = 3600.0
DEFAULT_HOUSEKEEPING_SECONDS = 5.0
DEFAULT_RESCAN_SECONDS = 10.0
DEFAULT_SETTLE_SECONDS = 2.0
DEFAULT_UNMATCHED_GRACE_SECONDS = 3600.0
DEFAULT_CONNECT_TIMEOUT_SECONDS = 3.0
DEFAULT_READ_TIMEOUT_SECONDS = 10.0
# Listen addresses that name no address a client could call.
_WILDCARD_HOSTS = {"0.0.0.0", "::"}


@dataclass(frozen=True)
class HttpsInterface:
    """An HTTPS listener with mandatory client certificates."""

    host: str
    port: int
    ca_client_cert_path: Path
    server_cert_path: Path
    server_key_path: Path

    @property
    def listen_address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url_authority(self) -> str:
        """Host and port as a URL writes them (an IPv6 address in brackets)."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else self.listen_address


@dataclass(frozen=True)
class Limits:
    """What the KME promises in Get status; sizes are in bits."""

    key_size: int = 256
    min_key_size: int = 64
    max_key_size: int = 8192
    max_key_per_request: int = 128
    max_key_count: int = 100_000_000
    max_SAE_ID_count: int = 4

    def refusal(self, size_bits: int, keys: int, what: str) -> str | None:
        """Why a peer KME's ``what`` of ``keys`` keys of ``size_bits`` each is outside these limits, or None."""
        if size_bits % 8 or not self.min_key_size <= size_bits <= self.max_key_size:
            return (f"size {size_bits} is outside this KME's limits ({self.min_key_size} to {self.max_key_size}, "
                    "multiple of 8)")
        if keys > self.max_key_per_request:
            return f"at most {self.max_key_per_request} keys per {what}"
        return None


@dataclass(frozen=True)
class KekSource:
    """Where the key-encryption key comes from (kme.storage.kek opens it); never the key itself.

    ``kind``: "file", "credential" (a systemd credential), "pkcs11" (a key on a token),
    "generated" (the file created beside the configuration when the field is absent)
    or "ephemeral" (an in-memory database: a random key that dies with the process).
    """

    kind: str
    path: Path | None = None
    name: str = ""
    module: str = ""
    token: str = ""
    pin_source: Path | None = None
    pin_value: str = field(default="", repr=False)

    def describe(self) -> str:
        """One line for operators: the kind and place, never a PIN or a key."""
        return {
            "file": f"file {self.path}",
            "credential": f"systemd credential {self.name}",
            "pkcs11": f"PKCS#11 key {self.name!r} on token {self.token!r} (module {self.module})",
            "generated": f"generated file {self.path} (move it to other storage, see docs/security.md)",
            "ephemeral": "random key in memory (in-memory database)",
        }[self.kind]


@dataclass(frozen=True)
class ThisKme:
    id: Id
    nickname: str
    database_uri: str
    key_encryption_key: KekSource
    key_directory_to_watch: Path
    saes_https_interface: HttpsInterface
    kmes_https_interface: HttpsInterface | None
    skip_https_interface: HttpsInterface | None
    interop_https_interface: HttpsInterface | None
    etsi004_interface: HttpsInterface | None
    debugging_http_interface: str | None
    debugging_http_allow_non_loopback: bool
    interop_https_allow_any_network: bool
    metrics_directory: Path | None
    log_level: str
    log_format: str
    delete_key_file_after_read: bool
    key_expiry_seconds: float
    housekeeping_interval_seconds: float
    rescan_interval_seconds: float
    key_file_settle_seconds: float
    unmatched_key_grace_seconds: float
    limits: Limits


@dataclass(frozen=True)
class OtherKme:
    id: Id
    key_directory_to_watch: Path
    inter_kme_bind_address: str
    ignore_system_proxy_settings: bool
    https_client_authentication_certificate: Path
    https_client_authentication_certificate_password: str
    server_ca_cert_path: Path | None
    https_client_certificate_serial: int | None
    connect_timeout_seconds: float
    read_timeout_seconds: float


@dataclass(frozen=True)
class ForeignKms:
    """Another vendor's key management system in the same trusted node (ETSI GS QKD 020, docs/interop.md)."""

    id: Id
    https_client_certificate_serial: int
    base_url: str
    https_client_authentication_certificate: Path
    https_client_authentication_certificate_password: str
    server_ca_cert_path: Path
    connect_timeout_seconds: float
    read_timeout_seconds: float
    # The SAEs of our network it may deliver keys to (ext_keys); none unless listed.
    target_sae_ids: tuple[Id, ...]
    # Attempts to deliver one acknowledgement before it is kept as failed.
    ack_attempts: int
    # Where it sends its acknowledgements of the keys we pass it: our interop interface's ext_keys/ack.
    ack_callback_url: str


@dataclass(frozen=True)
class Sae:
    id: Id
    kme_id: Id
    certificate_serial: int | None


@dataclass(frozen=True)
class KmeConfig:
    """The whole validated configuration, with lookups the request path needs."""

    this_kme: ThisKme
    other_kmes: tuple[OtherKme, ...]
    saes: tuple[Sae, ...]
    source: Path | None = field(default=None, compare=False)
    # (destination KME, the neighbour that is the next hop towards it), for KMEs we have no link with.
    routes: tuple[tuple[Id, Id], ...] = ()
    foreign_kms: tuple[ForeignKms, ...] = ()

    @property
    def in_memory(self) -> bool:
        return self.this_kme.database_uri == IN_MEMORY_URI

    @cached_property
    def saes_by_id(self) -> dict[Id, Sae]:
        return {sae.id: sae for sae in self.saes}

    @cached_property
    def local_saes_by_serial(self) -> dict[int, Sae]:
        return {sae.certificate_serial: sae for sae in self.saes if sae.certificate_serial is not None}

    @cached_property
    def other_kmes_by_id(self) -> dict[Id, OtherKme]:
        return {peer.id: peer for peer in self.other_kmes}

    def next_hop(self, kme_id: Id) -> OtherKme | None:
        """The neighbour through which keys for ``kme_id`` go: the KME itself when linked, its route's via else."""
        return self.other_kmes_by_id.get(self.routes_by_destination.get(kme_id, kme_id))

    @cached_property
    def routes_by_destination(self) -> dict[Id, Id]:
        return dict(self.routes)

    @cached_property
    def kme_ids_by_number(self) -> dict[int, Id]:
        """Each KME this KME knows (itself, its links, its routes' destinations) and each foreign KMS, by the number
        that stores its ID."""
        known = [self.this_kme.id, *(peer.id for peer in self.other_kmes), *(kme for kme, _via in self.routes),
                 *(foreign.id for foreign in self.foreign_kms)]
        return {ids.number(kme_id): kme_id for kme_id in known}

    @cached_property
    def sae_ids_by_number(self) -> dict[int, Id]:
        """Each configured SAE by the number that stores its ID."""
        return {ids.number(sae.id): sae.id for sae in self.saes}

    def sae_id(self, stored) -> Id:
        """The configured ID of the SAE whose ID the database stores as ``stored`` (itself if none is configured)."""
        return self.sae_ids_by_number.get(stored, stored)

    def kme_id(self, stored) -> Id:
        """The configured ID of the KME whose ID the database stores as ``stored`` (itself if none is configured)."""
        return self.kme_ids_by_number.get(stored, stored)

    @cached_property
    def foreign_kms_by_id(self) -> dict[Id, ForeignKms]:
        return {foreign.id: foreign for foreign in self.foreign_kms}

    @cached_property
    def foreign_kms_by_serial(self) -> dict[int, ForeignKms]:
        """Each foreign KMS by the serial of the client certificate it calls the interop interface with."""
        return {foreign.https_client_certificate_serial: foreign for foreign in self.foreign_kms}

    def peer_by_serial(self, serial: int) -> OtherKme | None:
        """The other KME that calls with a client certificate of this serial.

        With a single other KME and no serial configured for it, every
        certificate of the KME CA is that KME (gunicorn_conf warns at start).
        """
        for peer in self.other_kmes:
            if peer.https_client_certificate_serial == serial:
                return peer
        if len(self.other_kmes) == 1 and self.other_kmes[0].https_client_certificate_serial is None:
            return self.other_kmes[0]
        return None

    def key_directories(self) -> dict[Id, Path]:
        """Key directory of each link, keyed by the peer KME ID (our own ID: the local zone)."""
        dirs = {self.this_kme.id: self.this_kme.key_directory_to_watch}
        dirs.update({peer.id: peer.key_directory_to_watch for peer in self.other_kmes})
        return dirs


def load_config(path: str | os.PathLike | None = None) -> KmeConfig:
    """Read and validate the configuration file named by ``path`` or KME_CONFIG."""
    if path is None:
        path = os.environ.get("KME_CONFIG")
        if not path:
            raise ConfigError("KME_CONFIG: not set (it names the configuration file)")
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc.__class__.__name__}: {exc})") from None
    try:
        raw = json5.loads(text)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON or JSON5 ({exc})") from None
    return parse_config(raw, base_dir=path.parent, source=path)


def parse_config(raw, base_dir: Path, source: Path | None = None) -> KmeConfig:
    """Validate an already parsed configuration document; relative paths resolve against base_dir."""
    try:
        data = ConfigSchema().load(raw)
    except ValidationError as exc:
        raise ConfigError("\n".join(f"{where}: {message}" for where, message in all_errors(exc.messages))) from None
    this_kme = _this_kme(data["this_kme"], base_dir, source)
    other_kmes = tuple(_other_kme(i, item, base_dir) for i, item in enumerate(data["other_kmes"]))
    saes = tuple(_sae(i, item, this_kme.id) for i, item in enumerate(data["saes"]))
    routes = config_checks.routes(data["routes"], this_kme.id, {peer.id for peer in other_kmes})
    foreign = tuple(_foreign_kms(i, item, base_dir, this_kme.interop_https_interface)
                    for i, item in enumerate(data["foreign_kms"]))
    config_checks.check_foreign(foreign, {this_kme.id, *(peer.id for peer in other_kmes), *routes})
    config_checks.check_ids(this_kme, other_kmes, saes, set(routes), {entry.id for entry in foreign})
    config_checks.check_foreign_targets(foreign, saes)
    return KmeConfig(this_kme=this_kme, other_kmes=other_kmes, saes=saes, source=source,
                     routes=tuple(routes.items()), foreign_kms=foreign)


def _file(base_dir: Path, value: str, where: str) -> Path:
    path = (base_dir / value).resolve()
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as exc:
        reason = "not found" if isinstance(exc, FileNotFoundError) else f"cannot read ({exc.strerror})"
        raise ConfigError(f"{where}: {reason}: {path}") from None
    return path


def _certificate(base_dir: Path, value: str, where: str) -> Path:
    path = _file(base_dir, value, where)
    try:
        x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ConfigError(f"{where}: not a PEM certificate: {path}") from None
    return path


def _client_cas(base_dir: Path, value: str, where: str, several: bool) -> Path:
    """The file of the CAs whose client certificates the interface accepts; one CA unless ``several``.

    Clients are known by their certificate's serial number alone: any CA in
    the file could issue a certificate with a registered serial.
    """
    path = _certificate(base_dir, value, where)
    count = len(x509.load_pem_x509_certificates(path.read_bytes()))
    if count > 1 and not several:
        raise ConfigError(f"{where}: {path} holds {count} certificates; clients are known by their certificate's "
                          "serial number, which any CA of the file could issue: keep only the CA that issues the "
                          "clients' certificates, or set several_client_cas: true beside it")
    return path


def _https_interface(data: dict, base_dir: Path, where: str) -> HttpsInterface:
    host, port = data["listen_address"].rsplit(":", 1)
    return HttpsInterface(
        host=host.strip("[]"),
        port=int(port),
        ca_client_cert_path=_client_cas(base_dir, data["ca_client_cert_path"], f"{where}.ca_client_cert_path",
                                        data.get("several_client_cas", False)),
        server_cert_path=_certificate(base_dir, data["server_cert_path"], f"{where}.server_cert_path"),
        server_key_path=_file(base_dir, data["server_key_path"], f"{where}.server_key_path"),
    )


def _database_uri(data: dict, base_dir: Path) -> str:
    if "sqlite_db_path" in data and "db_uri" in data:
        raise ConfigError("this_kme.db_uri: give either sqlite_db_path or db_uri, not both")
    if "db_uri" in data:
        return database_uris.normalized(data["db_uri"], base_dir)
    if "sqlite_db_path" in data:
        return database_uris.sqlite_path_uri(data["sqlite_db_path"], base_dir)
    raise ConfigError("this_kme.sqlite_db_path: missing")


def _metrics_directory(data: dict, base_dir: Path, kme_id: Id, database_uri: str) -> Path | None:
    """Where the processes of a KME share their metrics; none for an in-memory database.

    prometheus-client memory-maps these files: on the database's disk, a full
    disk would kill the workers with SIGBUS. The default is therefore in a
    runtime directory (KME_RUNTIME_DIR, else the tmpfs /dev/shm).
    """
    if "metrics_directory" in data:
        return (base_dir / data["metrics_directory"]).resolve()
    if database_uri == IN_MEMORY_URI:
        return None
    runtime = os.environ.get("KME_RUNTIME_DIR")
    if not runtime:
        runtime = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()
    digest = hashlib.sha256(database_uri.encode()).hexdigest()[:12]
    return Path(runtime) / f"kme-{ids.in_file_name(kme_id, 64)}-{digest}-metrics"


def _limits(data: dict) -> Limits:
    limits = Limits(**data)
    if not limits.min_key_size <= limits.key_size <= limits.max_key_size:
        raise ConfigError("this_kme.limits.key_size: must lie between min_key_size and max_key_size")
    for name in ("key_size", "min_key_size", "max_key_size"):
        if getattr(limits, name) % 8:
            raise ConfigError(f"this_kme.limits.{name}: must be a multiple of 8")
    return limits


def kek_source(value: str | None, base_dir: Path, source: Path | None, database_uri: str) -> KekSource:
    """``this_kme.key_encryption_key``: a file path, ``credential:NAME`` or a ``pkcs11:`` URI (RFC 7512)."""
    if value is None:
        if database_uri == IN_MEMORY_URI:
            return KekSource("ephemeral")
        stem = source.stem if source is not None else "kme"
        return KekSource("generated", path=base_dir / f"{stem}.kek")
    if value.startswith("credential:"):
        name = value[len("credential:"):]
        if not name or "/" in name or name in (".", ".."):
            raise ConfigError("this_kme.key_encryption_key: credential: needs the name of a systemd credential")
        return KekSource("credential", name=name)
    if value.startswith("pkcs11:"):
        return _pkcs11_source(value, base_dir)
    return KekSource("file", path=(base_dir / value).resolve())


def _pkcs11_source(uri: str, base_dir: Path) -> KekSource:
    """The attributes of a PKCS#11 URI that name an AES key: token, object, module-path, pin-source or pin-value."""
    where = "this_kme.key_encryption_key"
    path, _, query = uri[len("pkcs11:"):].partition("?")
    attributes = {}
    for part in (item for chunk in (path.split(";"), query.split("&")) for item in chunk if item):
        name, equals, value = part.partition("=")
        if not equals:
            raise ConfigError(f"{where}: {part!r} is not an attribute=value of a PKCS#11 URI")
        attributes[name] = unquote(value)
    unknown = sorted(set(attributes) - {"token", "object", "type", "module-path", "pin-source", "pin-value"})
    if unknown:
        raise ConfigError(f"{where}: PKCS#11 URI attribute {unknown[0]} is not supported "
                          "(token, object, type, module-path, pin-source, pin-value)")
    for required in ("token", "object", "module-path"):
        if not attributes.get(required):
            raise ConfigError(f"{where}: the PKCS#11 URI needs {required}=")
    if attributes.get("type", "secret-key") != "secret-key":
        raise ConfigError(f"{where}: the PKCS#11 URI must name a secret key (type=secret-key)")
    if "pin-source" in attributes and "pin-value" in attributes:
        raise ConfigError(f"{where}: give pin-source or pin-value, not both")
    pin_source = attributes.get("pin-source")
    if pin_source is not None:
        pin_source = (base_dir / pin_source.removeprefix("file:")).resolve()
    return KekSource("pkcs11", name=attributes["object"], module=attributes["module-path"],
                     token=attributes["token"], pin_source=pin_source, pin_value=attributes.get("pin-value", ""))


def _this_kme(data: dict, base_dir: Path, source: Path | None) -> ThisKme:
    optional = {name: data.get(name) and _https_interface(data[name], base_dir, f"this_kme.{name}")
                for name in ("kmes_https_interface", "skip_https_interface", "interop_https_interface",
                             "etsi004_interface")}
    database_uri = _database_uri(data, base_dir)
    return ThisKme(
        id=data["id"],
        nickname=data.get("nickname") or f"KME {data['id']}",
        database_uri=database_uri,
        key_encryption_key=kek_source(data.get("key_encryption_key"), base_dir, source, database_uri),
        key_directory_to_watch=(base_dir / data["key_directory_to_watch"]).resolve(),
        saes_https_interface=_https_interface(data["saes_https_interface"], base_dir, "this_kme.saes_https_interface"),
        **optional,
        debugging_http_interface=data.get("debugging_http_interface"),
        debugging_http_allow_non_loopback=data.get("debugging_http_allow_non_loopback", False),
        interop_https_allow_any_network=data.get("interop_https_allow_any_network", False),
        metrics_directory=_metrics_directory(data, base_dir, data["id"], database_uri),
        log_level=data.get("log_level", "INFO"),
        log_format=data.get("log_format", "text"),
        delete_key_file_after_read=data.get("delete_key_file_after_read", False),
        key_expiry_seconds=data.get("key_expiry_seconds", DEFAULT_KEY_EXPIRY_SECONDS),
        housekeeping_interval_seconds=data.get("housekeeping_interval_seconds", DEFAULT_HOUSEKEEPING_SECONDS),
        rescan_interval_seconds=data.get("rescan_interval_seconds", DEFAULT_RESCAN_SECONDS),
        key_file_settle_seconds=data.get("key_file_settle_seconds", DEFAULT_SETTLE_SECONDS),
        unmatched_key_grace_seconds=data.get("unmatched_key_grace_seconds", DEFAULT_UNMATCHED_GRACE_SECONDS),
        limits=_limits(data.get("limits", {})),
    )


def _client_pfx(base_dir: Path, data: dict, where: str) -> tuple[Path, str]:
    """The PKCS#12 client certificate an entry names, and its password, checked to open."""
    pfx = _file(base_dir, data["https_client_authentication_certificate"], f"{where}.https_client_authentication_certificate")
    password = data["https_client_authentication_certificate_password"]
    try:
        pkcs12.load_key_and_certificates(pfx.read_bytes(), password.encode())
    except ValueError:
        raise ConfigError(
            f"{where}.https_client_authentication_certificate: not a PKCS#12 file that this password opens: {pfx}"
        ) from None
    return pfx, password


def _foreign_kms(index: int, data: dict, base_dir: Path, interface: HttpsInterface | None) -> ForeignKms:
    where = f"foreign_kms[{index}]"
    if interface is None:
        raise ConfigError(f"{where}: a foreign KMS calls this KME's this_kme.interop_https_interface, which is not "
                          "configured")
    callback = data.get("ack_callback_url")
    if callback is None and interface.host in _WILDCARD_HOSTS:
        raise ConfigError(f"{where}.ack_callback_url: missing (the interop interface listens on {interface.host}, "
                          "which names no address the foreign KMS can call)")
    pfx, password = _client_pfx(base_dir, data, where)
    return ForeignKms(
        id=data["id"],
        https_client_certificate_serial=int.from_bytes(bytes(data["https_client_certificate_serial"]), "big"),
        base_url=data["base_url"].rstrip("/"),
        https_client_authentication_certificate=pfx,
        https_client_authentication_certificate_password=password,
        server_ca_cert_path=_certificate(base_dir, data["server_ca_cert_path"], f"{where}.server_ca_cert_path"),
        connect_timeout_seconds=data.get("connect_timeout_seconds", DEFAULT_CONNECT_TIMEOUT_SECONDS),
        read_timeout_seconds=data.get("read_timeout_seconds", DEFAULT_READ_TIMEOUT_SECONDS),
        target_sae_ids=tuple(data["target_sae_ids"]),
        ack_attempts=data["ack_attempts"],
        ack_callback_url=callback or f"https://{interface.url_authority}/kmapi/v1/ext_keys/ack",
    )


def _other_kme(index: int, data: dict, base_dir: Path) -> OtherKme:
    where = f"other_kmes[{index}]"
    pfx, password = _client_pfx(base_dir, data, where)
    ca = data.get("server_ca_cert_path")
    serial = data.get("https_client_certificate_serial")
    return OtherKme(
        id=data["id"],
        key_directory_to_watch=(base_dir / data["key_directory_to_watch"]).resolve(),
        inter_kme_bind_address=data["inter_kme_bind_address"],
        ignore_system_proxy_settings=data.get("ignore_system_proxy_settings", False),
        https_client_authentication_certificate=pfx,
        https_client_authentication_certificate_password=password,
        server_ca_cert_path=ca and _certificate(base_dir, ca, f"{where}.server_ca_cert_path"),
        https_client_certificate_serial=serial and int.from_bytes(bytes(serial), "big"),
        connect_timeout_seconds=data.get("connect_timeout_seconds", DEFAULT_CONNECT_TIMEOUT_SECONDS),
        read_timeout_seconds=data.get("read_timeout_seconds", DEFAULT_READ_TIMEOUT_SECONDS),
    )


def _sae(index: int, data: dict, this_kme_id: Id) -> Sae:
    serial = data.get("https_client_certificate_serial")
    if data["kme_id"] == this_kme_id and serial is None:
        raise ConfigError(f"saes[{index}].https_client_certificate_serial: missing (required for the SAEs of this KME)")
    return Sae(id=data["id"], kme_id=data["kme_id"], certificate_serial=serial and int.from_bytes(bytes(serial), "big"))
