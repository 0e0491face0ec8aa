#!/usr/bin/env bash
# The whole suite twice at once: on SQLite (in the foreground, its test files shared out between two pytest-xdist
# workers) and on a throwaway PostgreSQL cluster (its output follows). The tests mostly wait on the KME processes
# they start: three streams keep the two cores busy (a fourth, with a second cluster, cost more than it gained).
# Each pass ends with its 20 slowest steps; the last line is the time both took (make test must stay under 10
# minutes on a 2-core machine, installs included).
# Usage: tests/run-engines.sh PYTHON [pytest arguments]
set -uo pipefail
python=$1
shift
started=$SECONDS
# The tests' files (databases, key files, logs) in memory when /dev/shm has 8 GiB free: the two passes' SQLite
# syncs and PostgreSQL's database copies then wait on no disk (a crash test kills processes, never the machine, so
# no test needs what a sync to disk adds). Elsewhere, on the disk.
if [ "$(df --output=avail -B1G /dev/shm 2>/dev/null | tail -n 1 | tr -d ' ')" -ge 8 ] 2>/dev/null; then
    work=$(mktemp -d -p /dev/shm kme-tests.XXXXXX)
else
    work=$(mktemp -d)
fi
export TMPDIR="$work"
# The KMEs' metrics folders too (by default in /dev/shm itself): the tests kill their processes, which then
# cannot remove them; here they go with the rest.
export KME_RUNTIME_DIR="$work/runtime"
mkdir "$KME_RUNTIME_DIR"
KME_TEST_ENGINE=postgresql "$python" -m pytest -c tests/pytest.ini -p no:cacheprovider --basetemp="$work/tmp" \
    --durations=20 "$@" \
    >"$work/postgresql.log" 2>&1 &
postgresql=$!
echo "== the suite on SQLite (the PostgreSQL pass runs beside it; its output follows)"
# A test file runs whole on one worker, in its order: module fixtures start once, and a test that must run last
# in its file does.
"$python" -m pytest -c tests/pytest.ini --basetemp="$work/sqlite" --durations=20 --numprocesses 2 --dist loadfile "$@"
sqlite_status=$?
wait "$postgresql"
postgresql_status=$?
echo "== the suite on PostgreSQL"
cat "$work/postgresql.log"
rm -rf "$work"
echo "== both passes took $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s"
[ "$sqlite_status" -eq 0 ] && [ "$postgresql_status" -eq 0 ]
