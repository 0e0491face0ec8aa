"""kme.storage.backends.sqlite_connections through the SQLite backend of an engine, on a real SQLite file, with real
threads: group commit, and the connections kept out of SQLAlchemy's pool."""
import sqlite3
import threading
import time
from contextlib import closing

import pytest
from sqlalchemy import create_engine

from kme.storage.backends import sqlite

pytestmark = pytest.mark.sqlite_only

THREADS = 8


@pytest.fixture
def backend(tmp_path):
    backend = sqlite.Backend(create_engine(f"sqlite:///{tmp_path / 'shared.db'}"))
    with backend.read_connection() as connection:
        connection.execute("CREATE TABLE parent (id INTEGER PRIMARY KEY)")
        connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY, parent INTEGER "
                           "REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED)")
    yield backend
    backend.dispose()


def _stored(backend) -> list[int]:
    with backend.read_connection() as connection:
        return [row[0] for row in connection.execute("SELECT id FROM rows ORDER BY id")]


def _insert(value: int, then=None):
    def work(connection):
        connection.execute("INSERT INTO rows (id) VALUES (?)", (value,))
        if then is not None:
            then()
        return value, threading.get_ident()
    return work


def _running(started: threading.Event, release: threading.Event):
    """A unit's last step: say it is running (its batch taken, its transaction open), then wait for ``release``."""
    def then():
        started.set()
        release.wait(10)
    return then


def _wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.005)


def _start(backend, works) -> tuple[list[threading.Thread], dict]:
    outcomes = {}

    def call(index, work):
        try:
            outcomes[index] = backend.grouped_write(work)
        except Exception as exc:
            outcomes[index] = exc

    threads = [threading.Thread(target=call, args=(index, work)) for index, work in works]
    for thread in threads:
        thread.start()
    return threads, outcomes


def _waiting(backend) -> int:
    return backend.group_commit.waiting()


def test_callers_arriving_while_a_batch_runs_join_its_transaction(backend):
    release, started = threading.Event(), threading.Event()
    first, first_outcome = _start(backend, [(0, _insert(0, then=_running(started, release)))])
    started.wait(10)
    others, outcomes = _start(backend, [(index, _insert(index)) for index in range(1, THREADS)])
    _wait_until(lambda: _waiting(backend) == THREADS - 1)
    release.set()
    for thread in first + others:
        thread.join(10)
    outcomes.update(first_outcome)
    assert sorted(value for value, _ in outcomes.values()) == list(range(THREADS))
    # The first caller's leader ran every one of them, in its one transaction.
    assert {thread for _, thread in outcomes.values()} == {first_outcome[0][1]}
    assert _stored(backend) == list(range(THREADS))
    assert not backend.group_commit.leading()


def test_a_unit_that_raises_is_undone_alone_and_gets_its_own_exception(backend):
    release, started = threading.Event(), threading.Event()
    first, _ = _start(backend, [(0, _insert(0, then=_running(started, release)))])
    started.wait(10)

    def refuse():
        raise ValueError("refused")

    others, outcomes = _start(backend, [(1, _insert(1)), (2, _insert(2, then=refuse)), (3, _insert(3))])
    _wait_until(lambda: _waiting(backend) == 3)
    release.set()
    for thread in first + others:
        thread.join(10)
    assert isinstance(outcomes[2], ValueError) and str(outcomes[2]) == "refused"
    assert outcomes[1][0] == 1 and outcomes[3][0] == 3
    assert _stored(backend) == [0, 1, 3]


def test_a_failed_commit_fails_every_unit_of_the_batch_and_keeps_nothing(backend):
    release, started = threading.Event(), threading.Event()
    first, first_outcome = _start(backend, [(0, _insert(0, then=_running(started, release)))])
    started.wait(10)

    def orphan(connection):
        # A deferred foreign key: the unit itself succeeds, the COMMIT fails.
        connection.execute("INSERT INTO rows (id, parent) VALUES (99, 12345)")

    others, outcomes = _start(backend, [(1, _insert(1)), (2, orphan), (3, _insert(3))])
    _wait_until(lambda: _waiting(backend) == 3)
    release.set()
    for thread in first + others:
        thread.join(10)
    outcomes.update(first_outcome)
    # Units 1 to 3 joined unit 0's transaction, whose COMMIT failed: nothing of any of them is kept.
    assert all(isinstance(outcomes[index], sqlite3.IntegrityError) for index in (0, 1, 2, 3))
    assert _stored(backend) == []
    # The next caller leads a fresh transaction.
    assert backend.grouped_write(_insert(4))[0] == 4
    assert _stored(backend) == [4]


def test_a_value_is_returned_only_once_its_transaction_is_committed(backend):
    for value in range(5):
        backend.grouped_write(_insert(value))
        # A separate connection sees it: committed, not just written.
        with sqlite3.connect(backend.engine.url.database) as other:
            assert other.execute("SELECT COUNT(*) FROM rows WHERE id = ?", (value,)).fetchone()[0] == 1
        other.close()


def test_a_unit_alone_that_raises_keeps_nothing_and_the_next_caller_starts_fresh(backend):
    def half_then_refuse(connection):
        connection.execute("INSERT INTO rows (id) VALUES (7)")
        raise ValueError("refused")

    with pytest.raises(ValueError, match="refused"):
        backend.grouped_write(half_then_refuse)
    assert _stored(backend) == []
    assert backend.grouped_write(_insert(8))[0] == 8
    assert _stored(backend) == [8]


def test_a_unit_alone_whose_commit_fails_keeps_nothing(backend):
    def orphan(connection):
        connection.execute("INSERT INTO rows (id, parent) VALUES (9, 12345)")

    with pytest.raises(sqlite3.IntegrityError):
        backend.grouped_write(orphan)
    assert _stored(backend) == []
    assert backend.grouped_write(_insert(10))[0] == 10
    assert _stored(backend) == [10]


def test_callers_arriving_while_the_leader_waits_for_the_turn_join_its_batch(backend):
    # Another writer (here: this test, as another process would) holds the writers' turn.
    turn = backend.writers.turn()
    turn.__enter__()
    try:
        first, first_outcome = _start(backend, [(0, _insert(0))])
        _wait_until(lambda: backend.group_commit.leading())
        others, outcomes = _start(backend, [(index, _insert(index)) for index in range(1, THREADS)])
        _wait_until(lambda: _waiting(backend) == THREADS)
    finally:
        turn.__exit__(None, None, None)
    for thread in first + others:
        thread.join(10)
    outcomes.update(first_outcome)
    assert sorted(value for value, _ in outcomes.values()) == list(range(THREADS))
    # One leader ran them all, in one transaction.
    assert len({thread for _, thread in outcomes.values()}) == 1
    assert _stored(backend) == list(range(THREADS))


def test_a_first_unit_that_raises_is_undone_and_the_others_of_its_batch_commit(backend):
    def half_then_refuse(connection):
        connection.execute("INSERT INTO rows (id) VALUES (5)")
        raise ValueError("refused")

    turn = backend.writers.turn()
    turn.__enter__()
    try:
        first, first_outcome = _start(backend, [(0, half_then_refuse)])
        _wait_until(lambda: backend.group_commit.leading())
        others, outcomes = _start(backend, [(1, _insert(1)), (2, _insert(2))])
        _wait_until(lambda: _waiting(backend) == 3)
    finally:
        turn.__exit__(None, None, None)
    for thread in first + others:
        thread.join(10)
    assert isinstance(first_outcome[0], ValueError)
    assert outcomes[1][0] == 1 and outcomes[2][0] == 2
    assert _stored(backend) == [1, 2]


def _reader(backend) -> sqlite3.Connection:
    with backend.read_connection() as connection:
        return connection


def test_each_thread_keeps_its_own_connection_with_the_pragmas(backend):
    mine = _reader(backend)
    assert _reader(backend) is mine
    assert mine.execute("PRAGMA secure_delete").fetchone()[0] == 1
    found = []
    thread = threading.Thread(target=lambda: found.append(_reader(backend)))
    thread.start()
    thread.join(10)
    assert found and found[0] is not mine


def test_dispose_closes_every_kept_connection_and_the_next_use_opens_a_fresh_one(backend):
    old_reader = _reader(backend)
    backend.grouped_write(lambda connection: connection.execute("INSERT INTO rows (id) VALUES (1)"))
    backend.dispose()
    with pytest.raises(sqlite3.ProgrammingError):
        old_reader.execute("SELECT 1")
    fresh = _reader(backend)
    assert fresh is not old_reader
    backend.grouped_write(lambda connection: connection.execute("INSERT INTO rows (id) VALUES (2)"))
    assert [row[0] for row in fresh.execute("SELECT id FROM rows ORDER BY id")] == [1, 2]


def test_an_in_memory_database_is_read_through_the_pool(tmp_path):
    backend = sqlite.Backend(create_engine("sqlite:///:memory:"))
    with backend.read_connection() as connection:
        connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY)")
    backend.grouped_write(lambda connection: connection.execute("INSERT INTO rows (id) VALUES (3)"))
    with backend.read_connection() as connection:
        assert connection.execute("SELECT id FROM rows").fetchall() == [(3,)]
    # Its one connection's own commits leave the data version as it is: read each time.
    read = _counting_read()
    assert backend.read_unless_changed("rows", read) == [3]
    backend.grouped_write(lambda connection: connection.execute("INSERT INTO rows (id) VALUES (4)"))
    assert backend.read_unless_changed("rows", read) == [3, 4] and read.calls == 2
    backend.dispose()


def _counting_read():
    """A read of the rows' IDs that counts how often it ran."""
    def read(connection):
        read.calls += 1
        return [row[0] for row in connection.execute("SELECT id FROM rows ORDER BY id")]
    read.calls = 0
    return read


def test_a_read_is_answered_again_until_a_commit_anywhere_and_only_on_its_own_connection(backend):
    read = _counting_read()
    assert backend.read_unless_changed("rows", read) == []
    assert backend.read_unless_changed("rows", read) == [] and read.calls == 1
    # The group commit's connection commits: read again.
    backend.grouped_write(_insert(1))
    assert backend.read_unless_changed("rows", read) == [1] and read.calls == 2
    # Another connection of the file, as another process's would.
    with closing(sqlite3.connect(backend.engine.url.database)) as other:
        other.execute("INSERT INTO rows (id) VALUES (2)")
        other.commit()
    assert backend.read_unless_changed("rows", read) == [1, 2] and read.calls == 3
    assert backend.read_unless_changed("rows", read) == [1, 2] and read.calls == 3
    # Another thread reads on its own connection; a connection opened again after dispose() reads afresh.
    elsewhere = threading.Thread(target=lambda: backend.read_unless_changed("rows", read))
    elsewhere.start()
    elsewhere.join(10)
    assert read.calls == 4
    backend.dispose()
    assert backend.read_unless_changed("rows", read) == [1, 2] and read.calls == 5


def test_each_backend_keeps_the_state_of_its_own_file(tmp_path):
    # Two apps of one process on two files (their Storage objects): what one keeps never answers for the other.
    first, second = (sqlite.Backend(create_engine(f"sqlite:///{tmp_path / name}")) for name in ("one.db", "two.db"))
    for backend in (first, second):
        backend.grouped_write(lambda connection: connection.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY)"))
        assert backend.file_problem() is None
    (tmp_path / "two.db").rename(tmp_path / "moved.db")
    assert first.file_problem() is None
    assert "two.db was deleted" in second.file_problem()
    # Each has its own writers' turn: the other's writers do not wait while one holds its turn.
    done = threading.Event()
    with first.writers.turn():
        writer = threading.Thread(target=lambda: (second.grouped_write(_insert(1)), done.set()))
        writer.start()
        writer.join(10)
    assert done.is_set()
    for backend in (first, second):
        backend.dispose()


def _asking(backend, value: int, taken: list, read: list, then=None, answered=lambda: 0):
    """A unit that inserts ``value``, reads the batch's shared value (made once), and asks for ``taken`` to get the
    highest value of the units once their transaction committed, with the rows then committed and how many
    callers had their answer (``answered()``)."""
    def work(connection):
        connection.execute("INSERT INTO rows (id) VALUES (?)", (value,))
        scope = backend.transaction_scope()
        scope.once("read", lambda: read.append(value) or value)
        scope.after_commit("mark", value, lambda highest: taken.append((highest, _committed(backend), answered())))
        if then is not None:
            then()
        return value
    return work


def _committed(backend) -> list[int]:
    """What a connection of its own sees committed."""
    with closing(sqlite3.connect(backend.engine.url.database)) as other:
        return [row[0] for row in other.execute("SELECT id FROM rows ORDER BY id")]


def test_the_units_of_a_batch_read_once_and_act_once_after_its_commit_with_the_highest_value(backend):
    release, started = threading.Event(), threading.Event()
    taken, read, outcomes_seen = [], [], []

    def answered() -> int:
        return sum(len(outcomes) for outcomes in outcomes_seen)

    first, first_outcome = _start(backend, [(0, _asking(backend, 10, taken, read, _running(started, release),
                                                        answered))])
    started.wait(10)

    def refuse():
        raise ValueError("refused")

    others, outcomes = _start(backend, [(1, _asking(backend, 30, taken, read, answered=answered)),
                                        (2, _asking(backend, 99, taken, read, refuse, answered)),
                                        (3, _asking(backend, 20, taken, read, answered=answered))])
    outcomes_seen += [first_outcome, outcomes]
    _wait_until(lambda: _waiting(backend) == 3)
    # No action before the batch committed, nor while its callers wait.
    assert taken == []
    release.set()
    for thread in first + others:
        thread.join(10)
    # One read for the batch (by its first unit), one action after its commit, before any caller had its answer:
    # the highest value of the units that succeeded (99 was undone with its unit).
    assert read == [10]
    assert taken == [(30, [10, 20, 30], 0)]
    assert isinstance(outcomes[2], ValueError) and first_outcome[0] == 10
    # Outside a transaction of the group commit there is no scope; the next batch has a fresh one.
    assert backend.transaction_scope() is None
    assert backend.grouped_write(_asking(backend, 5, taken, read)) == 5
    assert read == [10, 5] and taken[-1] == (5, [5, 10, 20, 30], 0)


def test_a_batch_whose_commit_fails_takes_no_action(backend):
    taken, read = [], []

    def orphan(connection):
        # A deferred foreign key: the unit succeeds, the COMMIT fails.
        connection.execute("INSERT INTO rows (id, parent) VALUES (99, 12345)")
        backend.transaction_scope().after_commit("mark", 7, taken.append)

    with pytest.raises(sqlite3.IntegrityError):
        backend.grouped_write(orphan)
    assert taken == [] and _stored(backend) == []
    assert backend.grouped_write(_asking(backend, 8, taken, read)) == 8
    assert taken == [(8, [8], 0)]
