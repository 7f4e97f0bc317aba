# Everything a newcomer needs: `make demo` runs the lifecycle on a synthetic hospital, `make test` runs the
# tests, `make dev` opens the Dagster UI. Only python3 (3.11+) with pip is needed: the Makefile installs uv
# into .tools/ and the pinned environment (uv.lock) into .venv/.
SHELL := /bin/bash
PYTHON ?= python3
UV_VERSION := 0.13.8
TOOLS := $(CURDIR)/.tools
UV := $(TOOLS)/bin/uv
VENV := $(CURDIR)/.venv
export UV_COMPILE_BYTECODE := 1
export UV_PROJECT_ENVIRONMENT := $(VENV)
export DAGSTER_HOME := $(CURDIR)/.dagster_home
export CLINICAL_ML_DATA_ROOT ?= $(CURDIR)/data
HOST ?= 127.0.0.1
PORT ?= 3000
SCENARIO ?= default
PATIENTS ?= 3000
BATCHES ?= 5
# Days of admissions per batch of demo and synth (5 x 14 days: long enough for 30-day readmissions).
DAYS_PER_BATCH ?= 14

.PHONY: setup demo demo-drift dev test lint synth bench peers clean-data

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/pip install --quiet --disable-pip-version-check uv==$(UV_VERSION)

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

$(DAGSTER_HOME)/dagster.yaml: dagster.yaml
	mkdir -p $(DAGSTER_HOME)
	sed 's|dagster_home: {env: DAGSTER_HOME}|dagster_home: $(DAGSTER_HOME)|' dagster.yaml > $@

setup: $(VENV)/.synced $(DAGSTER_HOME)/dagster.yaml

## Run the whole lifecycle on the embedded synthetic hospital and print where the reports are.
## DATA=eicu|mimic runs it instead on a real de-identified demo database (../shared/data, else the committed
## subset), mapped by its adapter into data/<DATA>/. USECASE=name (or "a b") runs those use cases of usecases/
## instead of every one written for DATA.
demo: setup
	$(VENV)/bin/clinical-ml demo --scenario $(SCENARIO) --patients $(PATIENTS) --batches $(BATCHES) \
		--days-per-batch $(DAYS_PER_BATCH) --data $(or $(DATA),synthetic) $(foreach u,$(USECASE),--usecase $(u))

## A month of daily batches with a drift from day 20, replayed day by day through the real jobs into the
## instance (slow: tens of minutes); then `CLINICAL_ML_DATA_ROOT=data/drift make dev` shows the drift check
## failing on the right day, the retraining run and the promotion decision.
demo-drift: setup
	mkdir -p .tools/usecases-synthetic/monitoring
	cp usecases/icu_mortality_24h.yaml .tools/usecases-synthetic/
	cp usecases/monitoring/icu_mortality_24h.yaml .tools/usecases-synthetic/monitoring/
	$(VENV)/bin/clinical-ml replay \
		--data-root data/drift --usecases-dir .tools/usecases-synthetic --patients 6000 --batches 30 \
		--drift-from-batch 20 --approve-first-model

## Dagster UI (asset graph, runs, reports) with the landing sensor and nightly schedule running.
## SIGINT (Ctrl-C) or SIGTERM stops it within seconds (clinical_ml/devserver.py: dagster dev in its own process
## group with default signal handling, stragglers killed after CLINICAL_ML_DEV_STOP_GRACE_S, default 6 s).
## DATA=eicu|mimic browses what `make demo DATA=...` wrote (data/<DATA>/, the use cases written for it).
dev: setup
	cd $(CURDIR) && export CLINICAL_ML_DATA=$(or $(DATA),synthetic) \
		$(if $(filter-out synthetic,$(or $(DATA),synthetic)),CLINICAL_ML_DATA_ROOT=$(CLINICAL_ML_DATA_ROOT)/$(DATA)) \
		&& exec $(VENV)/bin/python -m clinical_ml.devserver \
		$(VENV)/bin/dagster dev -w workspace.yaml -h $(HOST) -p $(PORT)

## Write a synthetic hospital into the landing zone (SCENARIO=default|drift|bias, PATIENTS, BATCHES,
## DAYS_PER_BATCH).
synth: setup
	$(VENV)/bin/clinical-ml synth --scenario $(SCENARIO) --patients $(PATIENTS) --batches $(BATCHES) \
		--days-per-batch $(DAYS_PER_BATCH)

## The tests; those of BESIDE run in a second pytest at the same time, their output printed after the others'
## (the target fails when either fails). test_killed_run spends its ~85 s waiting for a run's max runtime, with
## about 0.2 of a CPU busy: beside the others it costs CI about 15 s instead of 85 s.
BESIDE ?= clinical_ml_tests/e2e/test_killed_run.py
test: setup
	@side_log=$$(mktemp) && side_tmp=$$(mktemp -d) && \
	{ $(VENV)/bin/pytest -p no:cacheprovider --basetemp=$$side_tmp/t $(BESIDE) >$$side_log 2>&1 & side=$$!; } && \
	trap 'kill $$side 2>/dev/null; rm -rf $$side_log $$side_tmp' EXIT && \
	{ $(VENV)/bin/pytest $(foreach t,$(BESIDE),--ignore=$(t)); main_rc=$$?; } ; \
	wait $$side; side_rc=$$?; \
	echo "===== beside the others: $(BESIDE) ====="; cat $$side_log; \
	echo "make test: pytest exited $$main_rc, the pytest of $(BESIDE) exited $$side_rc"; \
	[ $$main_rc -eq 0 ] && [ $$side_rc -eq 0 ]

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

## The peer tools of bench_drift (Evidently, NannyML) in their own environment, every package pinned in
## benchmarks/peers/requirements.lock (Evidently does not import under the project's pandas 3).
PEERS_VENV := $(CURDIR)/benchmarks/.peers-venv
$(PEERS_VENV)/.synced: $(UV) benchmarks/peers/requirements.lock
	$(UV) venv --quiet --allow-existing --python $(PYTHON) $(PEERS_VENV)
	$(UV) pip install --quiet --python $(PEERS_VENV)/bin/python -r benchmarks/peers/requirements.lock
	touch $@

peers: $(PEERS_VENV)/.synced

## Every stage beside its baseline on a synthetic hospital (SCALE=default: 100k admissions; SCALE=small: a
## quick run); writes benchmarks/results/latest.md and latest.json. Not part of `make test`. The Celery row
## runs on PostgreSQL, as deploy/celery does: .ci/postgres.sh starts a throwaway server on loopback for the
## run (or uses DAGSTER_PG_* from the environment); without one that row falls back to SQLite and says so.
SCALE ?= default
bench: setup peers
	bash -c 'source .ci/postgres.sh && $(VENV)/bin/python -m benchmarks.bench --scale $(SCALE)'

clean-data:
	rm -rf data/landing data/archive data/quarantine data/phi data/deid data/registry data/reports $(DAGSTER_HOME)/storage $(DAGSTER_HOME)/history $(DAGSTER_HOME)/schedules
