# Two commands on a fresh machine: `make demo` and `make test`. Everything installs from here.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
LINT_STAMP := $(VENV)/.installed-lint

.PHONY: demo local test test-citus soak fuzz lint bench bench-smoke clean install lock

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

# The whole local stack kept running, with the environment to paste printed (docs/cli.md, "Try it locally").
local: $(STAMP)
	$(PY) -m worker local

# Processes running the suite at once (pytest-xdist; each has its own PostgreSQL, emulator and moto). Most
# tests wait on I/O and timers, so 3 finish about twice as fast as 1 even on two cores. TEST_WORKERS=0: one process.
TEST_WORKERS ?= 3

# pytest exits 5 when PYTEST_ARGS selects no test: that is not a failure of the suite.
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) $(PYTEST_ARGS); rc=$$?; \
		if [ $$rc -eq 5 ]; then echo "no test selected by PYTEST_ARGS=$(PYTEST_ARGS)"; exit 0; fi; exit $$rc

# The database integration tests against a Citus cluster (a coordinator and two workers started per test
# process from the installed Citus: docs/citus.md). Where Citus is not installed it says so and exits 0.
CITUS_PG_BIN ?= /usr/lib/postgresql/15/bin
# The SQS service runs against Citus in tests/test_citus.py (`run --exit-when-idle`, compared with one
# PostgreSQL); tests/test_service.py and the dlq redrive test hold messages for 2 s, which a fresh Citus
# database's first statements (each new coordinator session connects to the workers) overrun on a loaded
# machine: redeliveries, not wrong rows.
CITUS_TESTS ?= tests/test_citus.py tests/test_ingest.py tests/test_lifecycle.py tests/test_reprocess.py \
	tests/test_reporting.py tests/test_dlq_jobs.py tests/test_submit.py tests/test_schema.py \
	tests/test_job_cascade.py tests/test_completion_clock.py tests/test_ratelimit_fleet.py tests/test_archive.py \
	tests/test_stays_gone.py tests/test_events.py
# Downgrades below 0012 rebuild the bulk tables by renaming their constraints, which Citus refuses on
# distributed tables: docs/citus.md says to undistribute first. Those tests run on one PostgreSQL only.
# Four tests are timed for one node: a reader polling during a re-ingest; a copy racing a delete (on the
# slower cluster it finds the job busy and comes back later, which also keeps the job deleted); and two
# `run` processes whose 2 s visibility timeout and 10 s event flush the cluster's first statements overrun
# (a redelivered copy re-ingests, so one more job.ingested; the flush ends before the last event is out).
# All four run in make test.
CITUS_DESELECT ?= not downgrade and not carries_jobs_over_and_back and not carries_rows_views_grants \
	and not redrive_job_then_all_and_the_worker_ingests_them \
	and not readers_polling_during_a_reingest and not a_copy_that_started_before_the_delete \
	and not jobs_ingested_and_failed_through_run_are_announced \
	and not a_sigkill_between_the_commit_and_the_publish
test-citus: $(TEST_STAMP)
	@if ! reason=$$($(PY) -m worker.local.citus check $(CITUS_PG_BIN)); then \
		echo "make test-citus skipped: $$reason"; exit 0; fi; \
	TEST_CITUS=1 CITUS_PG_BIN=$(CITUS_PG_BIN) $(PY) -m pytest -q -n $(TEST_WORKERS) $(CITUS_TESTS) \
		-k "$(CITUS_DESELECT)" $(PYTEST_ARGS)

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

# BENCH_CITUS=1: the same workloads on a coordinator and two workers from the installed Citus (docs/citus.md).
bench: $(TEST_STAMP)
	$(PY) bench/ingest_bench.py $(if $(BENCH_CITUS),--citus --json bench/results/citus.json,--json bench/results/latest.json)

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
