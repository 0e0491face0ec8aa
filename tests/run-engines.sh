#!/usr/bin/env bash
# The whole suite twice at once: on SQLite (in the foreground) and on a throwaway PostgreSQL cluster (its output
# follows). Both passes mostly wait on the KME processes they start, so together they take little longer than one.
# Each pass ends with its 20 slowest steps (make test must stay under 15 minutes on a 2-core machine).
# Usage: tests/run-engines.sh PYTHON [pytest arguments]
set -uo pipefail
python=$1
shift
work=$(mktemp -d)
KME_TEST_ENGINE=postgresql "$python" -m pytest -c tests/pytest.ini -p no:cacheprovider --basetemp="$work/tmp" \
    --durations=20 "$@" \
    >"$work/postgresql.log" 2>&1 &
postgresql=$!
echo "== the suite on SQLite (the PostgreSQL pass runs beside it; its output follows)"
"$python" -m pytest -c tests/pytest.ini --durations=20 "$@"
sqlite_status=$?
wait "$postgresql"
postgresql_status=$?
echo "== the suite on PostgreSQL"
cat "$work/postgresql.log"
rm -rf "$work"
[ "$sqlite_status" -eq 0 ] && [ "$postgresql_status" -eq 0 ]
