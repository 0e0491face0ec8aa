"""The KME's one vocabulary of errors, a leaf every layer may import: domain errors, which carry the message
for the client (storage and the peer client raise them too); the configuration's error; an ingestion that must
stop; and a broken invariant, which is a bug.

Only kme.interfaces.http_errors knows the domain errors' HTTP statuses.
"""

# Messages the standard prescribes byte for byte.
EXTENSION_MANDATORY_UNSUPPORTED = "not all extension_mandatory parameters are supported"
KEYS_NOT_FOUND = "one or more keys specified are not found on KME"
SIZE_NOT_MULTIPLE_OF_8 = "size shall be a multiple of 8"
SERVER_ERROR = "key data access error"


class ConfigError(Exception):
    """A configuration mistake; str() is the message for the operator, one line per mistake."""

    def for_operator(self) -> str:
        """The message as a process prints it at start: each line names the program."""
        return "\n".join(f"kme: {line}" for line in str(self).splitlines())


class IngestionHalted(Exception):
    """A key file's ingestion cannot go on now (the pool would exceed max_key_count; another process moved the
    file's position meanwhile): what was stored stays, the rest waits for a later run. str() says why."""


class BrokenInvariant(Exception):
    """A rule that holds by construction was broken (the accounting, a pad too short): a bug, never input."""


class KmeError(Exception):
    """A domain error: an ETSI message for the client and optional details (list of objects)."""

    def __init__(self, message: str, details: list[dict] | None = None):
        super().__init__(message)
        self.message = message
        self.details = details

    def body(self) -> dict:
        body = {"message": self.message}
        if self.details:
            body["details"] = self.details
        return body


class BadRequest(KmeError):
    """Malformed or out-of-range input; nothing changed."""


class NotAuthorized(KmeError):
    """The caller is not identified, or is not a slave SAE of a requested key."""


class KeysNotFound(KmeError):
    """One or more requested key IDs cannot be returned (the standard's message by default)."""

    def __init__(self, message: str = KEYS_NOT_FOUND):
        super().__init__(message)


class Forbidden(KmeError):
    """A peer KME acts outside its own link, master SAE or our slave SAEs."""


class ActivationConflict(KmeError):
    """A peer KME names keys this KME cannot activate, or an activation already settled otherwise."""


class NotEnoughKeys(KmeError):
    """The pool cannot serve the whole request; nothing was taken."""


class PeerFailure(KmeError):
    """A peer KME could not be reached, refused, or answered too late or wrongly (the message names it)."""


class PeerError(PeerFailure):
    """A call to a peer KME failed, as the peer client raises it: one of the three kinds below, since what the
    failure proves decides what becomes of the keys the call was about. The message says how, without
    internals."""


class PeerUnreachable(PeerError):
    """No connection could be made: the request never reached the peer."""


class PeerRefused(PeerError):
    """The peer answered with an error: by protocol it changed nothing.

    ``detail`` is the peer's own message: it goes to the log, never to an SAE.
    """

    def __init__(self, message: str, detail: str, status: int, relay_failure: dict | None = None):
        super().__init__(message)
        self.detail = detail
        self.status = status
        # Where a relay failed further on, as the peer said (kme.domain.relay checks and rewrites it).
        self.relay_failure = relay_failure


class PeerOutcomeUnknown(PeerError):
    """The request may have reached the peer, but no valid answer came back."""


class ForeignKmsFailure(PeerFailure):
    """A call to a foreign KMS (ETSI GS QKD 020) failed: unreachable, refused, or no answer in time."""


class RelayFailure(PeerFailure):
    """A relay did not reach its destinations; the message and ``relay_failure`` detail name the hop that failed.

    ``reason`` is one of REASONS: the KMEs before pass it on as it is, never a peer's own text.
    """

    REASONS = {
        "unreachable": "KME {next} could not be reached",
        "refused": "KME {next} refused it (HTTP {status})",
        "unknown": "KME {next} did not answer in time or answered wrongly; the keys are held back until settled",
        "no_keys": "not enough key material on the link",
        "no_route": "KME {at} has no route to KME {next}",
        "loop": "KME {next} is on the relay's path already (a routing loop)",
        "cancelled": "the relay was cancelled meanwhile",
        "foreign": "foreign KMS {next} did not take the keys",
    }

    def __init__(self, at: int, next_kme: int, reason: str, status: int | None = None):
        text = self.REASONS[reason].format(at=at, next=next_kme, status=status)
        super().__init__(f"relay failed at hop KME {at} -> KME {next_kme}: {text}",
                         [{"relay_failure": {"at_KME_ID": at, "next_KME_ID": next_kme, "reason": reason,
                                             "status": status}}])
        self.at, self.next_kme, self.reason, self.status = at, next_kme, reason, status


class StorageFailure(KmeError):
    """The database cannot be used (full, read-only, gone, replaced); the message names the cause."""

    def __init__(self, cause: str):
        super().__init__(f"{SERVER_ERROR}: {cause}")
        self.cause = cause
