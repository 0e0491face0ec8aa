"""Byte-value histograms of key material, and the Shannon entropy they give.

The KME keeps one histogram per link, updated with every change, so the
entropy of all held material costs 256 additions whatever the pool size.
"""
import math
import struct
from collections import Counter

_FORMAT = "<256Q"
EMPTY = bytes(struct.calcsize(_FORMAT))


def byte_counts(blobs) -> list[int]:
    """How often each byte value 0..255 occurs in the given byte strings."""
    counts = Counter(b"".join(blobs))
    return [counts[value] for value in range(256)]


def adjust(histogram: bytes, counts: list[int], sign: int) -> bytes:
    """The histogram with ``counts`` added (sign 1) or taken away (sign -1)."""
    current = struct.unpack(_FORMAT, histogram)
    updated = [have + sign * change for have, change in zip(current, counts)]
    if min(updated) < 0:
        raise ValueError("byte histogram would go negative: accounting is broken")
    return struct.pack(_FORMAT, *updated)


def merge(histograms) -> list[int]:
    """Element-wise sum of stored histograms."""
    total = [0] * 256
    for histogram in histograms:
        total = [a + b for a, b in zip(total, struct.unpack(_FORMAT, histogram))]
    return total


def shannon(counts: list[int]) -> float:
    """Shannon entropy in bits per byte; 0.0 when there is no material."""
    size = sum(counts)
    if not size:
        return 0.0
    return -sum(c / size * math.log2(c / size) for c in counts if c)
