# Two commands on a fresh machine: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: demo test soak fuzz lint bench bench-smoke clean install lock

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[local]'
	touch $@

$(TEST_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test]'
	touch $(STAMP) $@

$(LINT_STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet -e '.[test,lint]'
	touch $(STAMP) $(TEST_STAMP) $@

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m worker demo

# Processes running the suite at once (pytest-xdist; each has its own PostgreSQL, emulator and moto). Most
# tests wait on I/O and timers, so 3 finish about twice as fast as 1 even on two cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3

# pytest exits 5 when PYTEST_ARGS selects no test: that is not a failure of the suite.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "no test selected by PYTEST_ARGS=$(PYTEST_ARGS)"; exit 0; fi; exit $$rc

# The chaos test (tests/test_chaos.py: three `run` replicas under mixed faults) for 30 minutes; `make test`
# runs it for 45 s. CHAOS_SEED=N replays a run.
CHAOS_DURATION_S ?= 1800
soak: $(TEST_STAMP)
	CHAOS_DURATION_S=$(CHAOS_DURATION_S) $(PY) -m pytest -q -n 0 -s tests/test_chaos.py $(PYTEST_ARGS)

# The property-based suites with fresh random examples (make test uses a fixed seed); repeat to explore.
fuzz: $(TEST_STAMP)
	HYPOTHESIS_PROFILE=explore $(PY) -m pytest -q tests/test_hypothesis_pages.py tests/test_hypothesis_messages.py $(PYTEST_ARGS)

# pip-audit needs PyPI's JSON API; where the index serves none (as in this project's sandbox) the
# audit reports that it could not run instead of failing the build. AUDIT_ALLOW_UNAVAILABLE=0 enforces it.
lint: $(LINT_STAMP)
	@command -v promtool >/dev/null || { echo "installing promtool (Debian package prometheus)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }
	$(VENV)/bin/ruff check worker tests migrations bench
	$(VENV)/bin/mypy
	bash scripts/lint-deploy.sh
	AUDIT_ALLOW_UNAVAILABLE=$${AUDIT_ALLOW_UNAVAILABLE:-1} bash scripts/audit.sh

bench: $(TEST_STAMP)
	$(PY) bench/ingest_bench.py --json bench/results/latest.json

bench-smoke: $(TEST_STAMP)
	$(PY) bench/ingest_bench.py --smoke

# requirements.lock pins the base install (what the image carries: no embedded PostgreSQL, moto or
# matplotlib) with hashes. Re-run after changing dependencies in pyproject.toml.
lock:
	$(PYTHON) -m venv .lock-venv && .lock-venv/bin/pip install --quiet pip-tools
	.lock-venv/bin/pip-compile --quiet --generate-hashes --no-emit-find-links --no-emit-index-url \
		--output-file=requirements.lock --strip-extras pyproject.toml
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .local
