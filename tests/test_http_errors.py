"""kme.interfaces.http_errors: the one table of statuses, and the documents' words for each."""
import pytest

from kme.errors import (
    BadRequest,
    KeysNotFound,
    NotEnoughKeys,
    PeerFailure,
    PeerOutcomeUnknown,
    PeerRefused,
    PeerUnreachable,
    RelayFailure,
    StorageFailure,
)
from kme.interfaces import http_errors, openapi

pytestmark = pytest.mark.engine_independent


def test_every_status_answered_has_its_meaning_and_no_other_status_does():
    answered = set(http_errors.STATUS.values()) | set(http_errors.HTTP_MESSAGES) | {503}

    assert set(http_errors.MEANINGS) == answered


def test_a_domain_error_gets_the_status_of_its_kind():
    assert http_errors.http_status(KeysNotFound()) == http_errors.http_status(BadRequest("x")) == 400
    assert http_errors.http_status(RelayFailure(1, 2, "no_route")) == http_errors.http_status(PeerFailure("x")) == 503
    assert http_errors.http_status(NotEnoughKeys("x")) == http_errors.http_status(StorageFailure("x")) == 503


def test_a_failed_peer_call_is_a_503_whatever_the_peer_answered():
    # The peer's own status (a 400 it sent us) is never ours to give the client.
    failures = [PeerUnreachable("x"), PeerRefused("x", "its words", 400), PeerOutcomeUnknown("x")]
    assert [http_errors.http_status(failure) for failure in failures] == [503, 503, 503]
    assert PeerRefused("refused by KME 2", "its words", 400).body() == {"message": "refused by KME 2"}


def test_the_documents_describe_each_error_status_as_the_table_does():
    document = openapi.document("all")
    described = {code: answer["description"] for path in document["paths"].values() for operation in path.values()
                 for code, answer in operation["responses"].items() if not code.startswith("2")}

    assert described and all(http_errors.MEANINGS[int(code)] == text for code, text in described.items())
