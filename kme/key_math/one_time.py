"""One-time pad and one-time MAC of relayed keys, both keyed with key material of the hop's own link.

The pad: a key crosses a hop as ``key XOR pad``, the pad being as many
bytes of fresh link key material; used once, it reveals nothing about the
key (Shannon). The MAC: Poly1305 with a one-time key of 32 bytes of link key
material, a Wegman–Carter authenticator (an almost-universal polynomial hash
masked by a one-time pad), so a forger succeeds with probability at most
8·ceil(L/16)/2^106 for an L-byte message, whatever its computing power.
Neither key may ever serve for a second message: the callers consume both
with the relay, whatever its outcome.
"""
import hmac

from cryptography.hazmat.primitives.poly1305 import Poly1305

from kme.errors import BrokenInvariant

MAC_KEY_BYTES = 32
TAG_BYTES = 16


def xor(data: bytes, pad: bytes) -> bytes:
    """``data`` XOR the first len(data) bytes of ``pad`` (sealing and opening are the same)."""
    if len(pad) < len(data):
        raise BrokenInvariant("the pad is shorter than the data")
    return (int.from_bytes(data, "big") ^ int.from_bytes(pad[:len(data)], "big")).to_bytes(len(data), "big")


def tag(mac_key: bytes, message: bytes) -> bytes:
    """The one-time Poly1305 tag of ``message`` under 32 bytes of link key material."""
    return Poly1305.generate_tag(mac_key[:MAC_KEY_BYTES], message)


def verify(mac_key: bytes, message: bytes, received: bytes) -> bool:
    """Whether ``received`` is the tag of ``message`` (compared in constant time)."""
    return hmac.compare_digest(tag(mac_key, message), received)
