"""The one-time pad and the one-time Poly1305 MAC keyed with link key material (kme.key_math.one_time)."""
import os

import pytest

from kme.errors import BrokenInvariant
from kme.key_math import one_time

pytestmark = pytest.mark.engine_independent


def test_the_pad_seals_and_opens_and_uses_only_its_first_bytes():
    data, pad = os.urandom(40), os.urandom(64)
    sealed = one_time.xor(data, pad)

    assert sealed != data and len(sealed) == 40
    assert one_time.xor(sealed, pad) == data == one_time.xor(sealed, pad[:40])


def test_a_pad_shorter_than_the_data_is_a_bug_not_a_shorter_seal():
    with pytest.raises(BrokenInvariant, match="shorter"):
        one_time.xor(os.urandom(33), os.urandom(32))


def test_a_tag_verifies_only_its_message_under_its_key():
    key, message = os.urandom(32), b"relay message"
    tag = one_time.tag(key, message)

    assert len(tag) == one_time.TAG_BYTES and one_time.verify(key, message, tag)
    assert not one_time.verify(key, message + b"!", tag)
    assert not one_time.verify(os.urandom(32), message, tag)
