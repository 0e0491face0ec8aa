# The two entry points of the project: `make run` (the demo) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test suite bench openapi clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.run-deps: requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r requirements.txt
	touch $@

# wg-qrotator's wheel holds the ETSI GS QKD 004 client library it loads with ctypes: test_etsi004.py drives our
# server with it. Only the wheel is fetched (its pinned dependencies would fight ours), never installed.
$(VENV)/.test-deps: requirements.txt tests/requirements.txt | $(BIN)/python
	$(BIN)/pip install --quiet -r tests/requirements.txt
	$(BIN)/pip download --quiet --no-deps wg-qrotator==0.1.4 -d $(VENV)/wheels
	touch $@

# `make run KMES=3`: the line 1 - 2 - 3 of instance/line3, where KME 2 relays keys between KMEs 1 and 3.
run: $(VENV)/.run-deps
	$(BIN)/python deploy/demo.py $(if $(filter 3,$(KMES)),instance/line3)

# The suite on SQLite and on PostgreSQL (tests/run-engines.sh); KME_TEST_ENGINE=sqlite or postgresql and
# `$(BIN)/python -m pytest -c tests/pytest.ini` run one of them.
# Its last line is the time it took, the venv, installs and tools included (budget: 10 minutes on 2 cores).
test:
	@start=$$(date +%s); $(MAKE) --no-print-directory suite; status=$$?; \
		took=$$(( $$(date +%s) - start )); echo "== make test took $$((took / 60)) min $$((took % 60)) s"; exit $$status

suite: $(VENV)/.test-deps
	tests/install-tools.sh
	tests/run-engines.sh $(BIN)/python $(PYTEST_ARGS)

# Speed against the web stack's own ceiling, the abuse scenario, ingestion against plain sqlite3, SQLite
# against PostgreSQL with one and two front ends, a relay through two trusted nodes against a direct
# activation, and the app's own cost per call without a server (docs/performance.md); not part of `make test`.
bench: $(VENV)/.test-deps
	tests/install-tools.sh
	$(BIN)/python bench/web_stack.py
	$(BIN)/python bench/ingest.py
	$(BIN)/python bench/engines.py
	$(BIN)/python bench/relay.py
	$(BIN)/python bench/in_process.py

# docs/openapi.json from the marshmallow schemas (a test checks that it is current).
openapi: $(VENV)/.run-deps
	$(BIN)/python -c "import json, kme.interfaces.openapi as o; print(json.dumps(o.document('all'), indent=2))" > docs/openapi.json

clean:
	rm -rf $(VENV) instance/*.db instance/*.db-wal instance/*.db-shm instance/*.kek keys/*/.kme-database* \
		keys/*/.kme-handed-out
	rm -rf instance/line3/*.db instance/line3/*.db-wal instance/line3/*.db-shm instance/line3/*.kek \
		keys/line3/*/.kme-database* keys/line3/*/.kme-handed-out
