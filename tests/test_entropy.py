"""Byte histograms and Shannon entropy."""
import pytest

from kme.errors import BrokenInvariant
from kme.key_math import entropy

pytestmark = pytest.mark.engine_independent


def test_uniform_bytes_have_eight_bits():
    assert entropy.shannon(entropy.merge([entropy.apply(entropy.EMPTY, [bytes(range(256))])])) == pytest.approx(8.0)


def test_constant_bytes_have_zero_and_nothing_is_zero():
    assert entropy.shannon(entropy.merge([entropy.apply(entropy.EMPTY, [b"\x00" * 64])])) == 0.0
    assert entropy.shannon([0] * 256) == 0.0


def test_entropy_is_given_to_a_hundredth_of_a_bit_only():
    """The exact float of a histogram would tell which byte values a change of material added or removed."""
    histogram = entropy.apply(entropy.EMPTY, [bytes(range(200)) + bytes(3)])
    bits = entropy.of_histograms((histogram,))
    assert bits == round(bits, 2) and 7.5 < bits < 7.7
    assert entropy.shannon(entropy.merge([histogram])) == bits


def test_apply_adds_and_removes_and_refuses_negative():
    histogram = entropy.apply(entropy.EMPTY, added=[b"ab", b"b"])
    assert entropy.merge([histogram, histogram])[ord("b")] == 4
    assert entropy.apply(histogram, added=[b"a"], removed=[b"ab", b"ba"]) == entropy.apply(entropy.EMPTY, [b"a"], [b"a"])
    assert entropy.apply(histogram, removed=[b"ab", b"b"]) == entropy.EMPTY
    with pytest.raises(BrokenInvariant, match="accounting is broken"):
        entropy.apply(entropy.EMPTY, removed=[b"a"])
    assert not entropy.changed([b"ab", b"c"], [b"abc"]) and entropy.changed([b"ab"], [b"abc"])


def test_the_entropy_of_stored_histograms_follows_every_change():
    uniform = entropy.apply(entropy.EMPTY, [bytes(range(256))])
    constant = entropy.apply(entropy.EMPTY, [b"\x00" * 256])
    assert entropy.of_histograms((uniform,)) == pytest.approx(8.0)
    assert entropy.of_histograms((uniform, constant)) == entropy.shannon(entropy.merge([uniform, constant]))
    assert entropy.of_histograms((constant,)) == 0.0
    assert entropy.of_histograms((uniform,)) == pytest.approx(8.0)
