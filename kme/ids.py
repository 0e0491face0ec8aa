"""SAE and KME IDs as ETSI GS QKD 014 has them: strings, or the 64-bit integers of earlier configurations.

An ID is what the configuration names: an ``int`` (0 to 2^63 - 1) or a
``str`` of 1 to 291 characters from letters, digits, ``-``, ``_``, ``.`` and
``~`` that is not all digits (so ``/keys/3/status`` names the integer 3 and
nothing else). Every answer, message and event carries it as configured.

The database stores an ID as a signed 64-bit number: an integer as itself
(databases of earlier releases stay valid as they are), a string as a
negative number drawn from its SHA-256 digest. The configuration is checked
at start for two IDs with one number; the number never leaves the database
and the sealing of its rows.
"""
import hashlib
import re
from functools import lru_cache

# An SAE or KME ID as configured.
Id = int | str

ID_MAX = 2**63 - 1
NAME_MAX = 291
# A string ID's form (without the rule "not all digits"), as a regular expression and in OpenAPI documents.
PATTERN = f"[A-Za-z0-9._~-]{{1,{NAME_MAX}}}"
_NAME = re.compile(PATTERN)
# Domain separation of the numbers' digest from every other digest of the KME.
_NUMBER_CONTEXT = b"kme stored id\x00"
RULE = (f"an integer from 0 to 2^63-1, or 1 to {NAME_MAX} letters, digits, '-', '_', '.' or '~' "
        "that are not all digits")


def is_id(value) -> bool:
    """Whether ``value`` (from JSON) is an ID: an integer in range or a string of the allowed form."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return 0 <= value <= ID_MAX
    return isinstance(value, str) and _NAME.fullmatch(value) is not None and not value.isdigit()


def from_text(text: str):
    """The ID that a URL segment, a query value or a JSON string names (all digits: the integer), or None."""
    if text.isascii() and text.isdigit():
        value = int(text)
        return value if value <= ID_MAX else None
    return text if _NAME.fullmatch(text) else None


def from_json(value):
    """The ID a JSON value names: an integer, or a string as from_text reads it; None if it names none."""
    if isinstance(value, str):
        return from_text(value)
    return value if is_id(value) else None


def order(value) -> tuple:
    """The total order of IDs that both KMEs of a link compute alike: integers first, by value; then strings, by
    their UTF-8 bytes."""
    return (0, value, b"") if isinstance(value, int) else (1, 0, value.encode())


def number(value) -> int:
    """The signed 64-bit number that stores ``value`` (an ID, or a number read back: it is its own number)."""
    if type(value) is int:
        return value
    if isinstance(value, int):
        return int(value)
    return _string_number(value)


# A request stores its SAE IDs several times (rows, sealing); the configured IDs are few.
@lru_cache(maxsize=4096)
def _string_number(value: str) -> int:
    digest = hashlib.sha256(_NUMBER_CONTEXT + value.encode()).digest()
    return -1 - (int.from_bytes(digest[:8], "big") >> 1)


def in_file_name(value, longest: int) -> str:
    """``value`` as part of a file name of at most ``longest`` characters for it: itself (IDs are path-safe),
    or for a longer string its digest."""
    text = str(value)
    return text if len(text) <= longest else "sha256-" + hashlib.sha256(text.encode()).hexdigest()[:longest - 7]
