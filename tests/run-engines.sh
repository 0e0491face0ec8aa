#!/usr/bin/env bash
# The whole suite twice at once: on SQLite (in the foreground) and on a throwaway PostgreSQL cluster (its output
# follows). Both passes mostly wait on the KME processes they start, so together they take little longer than one.
# Usage: tests/run-engines.sh PYTHON [pytest arguments]
set -uo pipefail
python=$1
shift
work=$(mktemp -d)
KME_TEST_ENGINE=postgresql "$python" -m pytest -c tests/pytest.ini -p no:cacheprovider --basetemp="$work/tmp" "$@" \
    >"$work/postgresql.log" 2>&1 &
postgresql=$!
echo "== the suite on SQLite (the PostgreSQL pass runs beside it; its output follows)"
"$python" -m pytest -c tests/pytest.ini "$@"
sqlite_status=$?
wait "$postgresql"
postgresql_status=$?
echo "== the suite on PostgreSQL"
cat "$work/postgresql.log"
rm -rf "$work"
[ "$sqlite_status" -eq 0 ] && [ "$postgresql_status" -eq 0 ]
