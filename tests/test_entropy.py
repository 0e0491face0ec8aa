"""Byte histograms and Shannon entropy."""
import pytest

from kme.domain import entropy


def test_uniform_bytes_have_eight_bits():
    assert entropy.shannon(entropy.byte_counts([bytes(range(256))])) == pytest.approx(8.0)


def test_constant_bytes_have_zero_and_nothing_is_zero():
    assert entropy.shannon(entropy.byte_counts([b"\x00" * 64])) == 0.0
    assert entropy.shannon([0] * 256) == 0.0


def test_adjust_adds_and_removes_and_refuses_negative():
    counts = entropy.byte_counts([b"ab", b"b"])
    histogram = entropy.adjust(entropy.EMPTY, counts, 1)
    assert entropy.merge([histogram, histogram])[ord("b")] == 4
    assert entropy.adjust(histogram, counts, -1) == entropy.EMPTY
    with pytest.raises(ValueError):
        entropy.adjust(entropy.EMPTY, counts, -1)
