"""kme.ids: what an ID is, how URLs and bodies name one, the order both KMEs of a link compute, the stored
number."""
import pytest

from kme import ids
from kme.storage.keystore.progress import is_arbiter

pytestmark = pytest.mark.engine_independent


@pytest.mark.parametrize("value", [0, 1, 2**63 - 1, "alice-app", "CONSA", "a", "sae_5", "kme.gamma~3", "-5", "1e5",
                                   "1.5", "0x10", "x" * 291])
def test_ids_of_the_standard_and_of_earlier_releases(value):
    assert ids.is_id(value)


@pytest.mark.parametrize("value", [-1, 2**63, True, 1.0, None, [], "", "12", "x" * 292, "a b", "a/b", "säe", "a+b",
                                   "a%2F"])
def test_what_is_not_an_id(value):
    assert not ids.is_id(value)


def test_text_names_the_integer_when_all_digits_and_the_string_otherwise():
    assert ids.from_text("3") == 3 and ids.from_text("007") == 7
    assert ids.from_text("alice-app") == "alice-app"
    assert ids.from_text(str(2**63)) is None and ids.from_text("a/b") is None and ids.from_text("") is None
    # Non-ASCII digits are not digits here.
    assert ids.from_text("３") is None
    assert ids.from_json(3) == 3 and ids.from_json("3") == 3 and ids.from_json(True) is None


def test_the_order_puts_integers_first_then_strings_by_their_bytes():
    ordered = sorted(["b", 10, "B", "a-b", 2, "a", "z"], key=ids.order)
    assert ordered == [2, 10, "B", "a", "a-b", "b", "z"]
    # The arbiter of a link is the end whose ID comes first, computed alike at both ends.
    for first, second in [(2, "kme-a"), ("kme-a", "kme-b"), (1, 2), ("KME", "kme")]:
        assert is_arbiter(first, second) and not is_arbiter(second, first)


def test_integers_are_stored_as_themselves_strings_as_negative_numbers():
    assert ids.number(5) == 5 and ids.number(2**63 - 1) == 2**63 - 1
    stored = {ids.number(name) for name in ("alice-app", "bob-app", "CONSA", "CONSB")}
    assert len(stored) == 4 and all(-(2**63) <= number < 0 for number in stored)
    assert ids.number("alice-app") == ids.number("alice-app")
    # A number read back is its own number.
    assert ids.number(ids.number("alice-app")) == ids.number("alice-app")


def test_an_id_in_a_file_name_is_itself_or_its_digest_when_long():
    assert ids.in_file_name("alice-app", 64) == "alice-app" and ids.in_file_name(7, 64) == "7"
    long_name = ids.in_file_name("k" * 291, 24)
    assert len(long_name) == 24 and long_name.startswith("sha256-")
    assert long_name != ids.in_file_name("k" * 290 + "j", 24)
