"""SQLAlchemy Core statements compiled once per dialect and run on a driver connection (sqlite3, psycopg).

The hot path and ingestion run past SQLAlchemy's execution layer, whose
per-call work costs more than the statements themselves; they still write
their SQL once, as Core. A Statement is compiled the first time a dialect
runs it (and once per size of its lists: an IN list of n values has n
parameters), to the driver's own positional parameters; a call names its values, which are put in the order the compiled
text wants them. No SQL text is assembled or rewritten at run time. A value of a column whose type is a
TypeDecorator (an SAE or KME ID, kme.storage.models.StoredId) passes its bind processing, as it would through
SQLAlchemy; other values go to the driver as they are.
"""
from typing import NamedTuple

from sqlalchemy import TypeDecorator, bindparam
from sqlalchemy.dialects.postgresql import psycopg
from sqlalchemy.dialects.sqlite import pysqlite

# The dialects of the two drivers, with the parameter style each driver takes positionally.
SQLITE = pysqlite.dialect(paramstyle="qmark")
POSTGRESQL = psycopg.dialect(paramstyle="format")
# Compiled forms kept per statement: one per dialect and size of its lists (a lookup of n keys has its own).
_FORMS_KEPT = 512


class _Form(NamedTuple):
    sql: str
    # (name, None) for a value, (name, i) for item i of a list; in the order of the compiled text's parameters.
    order: tuple[tuple[str, int | None], ...]
    # The values the statement itself holds (literals such as a pool state), by parameter name.
    constants: dict
    # (position among the parameters, bind processor) of each value whose column type processes it.
    processed: tuple


class Statement:
    """A Core statement, compiled once per dialect.

    ``build`` is the statement, or, for a statement with ``lists`` (names of
    values that are lists: IN lists, the rows of a multi-row INSERT), a
    function of their sizes (keyword arguments) that builds it with n bind
    parameters ``name_1`` to ``name_n`` for a list of size n (``many``). ``row``: the parameter names of one row, for
    run_many (the rows' tuples are passed to the driver as they are).
    """

    __slots__ = ("_build", "lists", "row", "_forms")

    def __init__(self, build, lists: tuple[str, ...] = (), row: tuple[str, ...] = ()):
        self._build = build
        self.lists = lists
        self.row = row
        self._forms: dict = {}

    def form(self, dialect, sizes: tuple[int, ...] = ()) -> _Form:
        """The statement compiled for ``dialect`` and the sizes of its lists."""
        key = (dialect.name, sizes)
        found = self._forms.get(key)
        if found is None:
            if len(self._forms) >= _FORMS_KEPT:
                self._forms.pop(next(iter(self._forms)))
            found = self._forms[key] = self._compile(dialect, sizes)
        return found

    def _compile(self, dialect, sizes: tuple[int, ...]) -> _Form:
        clause = self._build(**dict(zip(self.lists, sizes))) if self.lists else self._build
        compiled = clause.compile(dialect=dialect)
        order, constants, processed = [], {}, []
        for position, name in enumerate(compiled.positiontup):
            base, _, number = name.rpartition("_")
            bound = compiled.binds.get(name)
            if bound is not None and isinstance(bound.type, TypeDecorator):
                processed.append((position, bound.type.process_bind_param))
            if base in self.lists and number.isdigit() and (bound is None or bound.required):
                order.append((base, int(number) - 1))
                continue
            order.append((name, None))
            # A literal of the statement (a pool state, a length).
            if not bound.required:
                constants[name] = bound.effective_value
        if self.row and (tuple(order) != tuple((name, None) for name in self.row) or constants):
            raise ValueError(f"the compiled parameters {compiled.positiontup} are not the row {self.row}")
        return _Form(compiled.string, tuple(order), constants, tuple(processed))


def many(name: str, size: int) -> list:
    """The ``size`` parameters of the list ``name`` (an IN list's items)."""
    return [bindparam(f"{name}_{number}") for number in range(1, size + 1)]


def run(connection, statement: Statement, **values):
    """Execute ``statement`` with the named ``values`` on a driver connection; its cursor."""
    sizes = tuple(len(values[name]) for name in statement.lists) if statement.lists else ()
    form = statement.form(connection.sql.dialect, sizes)
    if form.constants:
        values = {**form.constants, **values}
    parameters = [values[name] if index is None else values[name][index] for name, index in form.order]
    for position, process in form.processed:
        parameters[position] = process(parameters[position], connection.sql.dialect)
    return connection.execute(form.sql, parameters)


def run_many(connection, statement: Statement, rows):
    """Execute ``statement`` once per row (tuples in the order of its ``row``) in one executemany; the cursor."""
    form, dialect = statement.form(connection.sql.dialect), connection.sql.dialect
    if form.processed:
        rows = [_processed(row, form.processed, dialect) for row in rows]
    cursor = connection.cursor()
    cursor.executemany(form.sql, rows)
    return cursor


def _processed(row: tuple, processed: tuple, dialect) -> tuple:
    values = list(row)
    for position, process in processed:
        values[position] = process(values[position], dialect)
    return tuple(values)
