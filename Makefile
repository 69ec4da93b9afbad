# sofar_assets — two commands: `make run` (set-up + the whole pipeline) and `make test`.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
DAGSTER := $(VENV)/bin/dagster
DG := $(VENV)/bin/dg
SOFAR := $(VENV)/bin/sofar
export DAGSTER_HOME := $(CURDIR)/dagster_home
export SOFAR_CONFIG ?= $(CURDIR)/config/demo.yaml
DEMO_DAYS ?= 2026-11-01...2026-11-03
DEMO_CORRECTIONS ?= $(CURDIR)/.sofar/demo-data/corrections.csv
RUN_LOGS := -c config/run_logging.yaml
# MLflow's artifact download progress bars and INFO lines (sqlite table creation, input-example
# validation) are noise in run logs; its warnings still print. MLflow reads these from the env.
export MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR := false
export MLFLOW_LOGGING_LEVEL := WARNING

.PHONY: install run demo-data pipeline summary test bench ui ui-check lint docs clean bigquery-emulator prod-local test-stack chromium

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $@

install: $(VENV)/.installed

demo-data: install
	$(PY) -m sofar_assets.cli demo-data

# The pipeline part of `make run` (what `make bench` times): train + promote, then the demo days,
# then the corrections loop: a few inspectors' verdicts, the dataset rebuilt with them (the next
# `make pipeline` retrains on it), and the champion's real-world accuracy per demo day.
pipeline: demo-data
	$(DG) launch -m sofar_assets.definitions --job train_and_promote $(RUN_LOGS)
	$(DG) launch -m sofar_assets.definitions --assets daily_predictions --partition-range $(DEMO_DAYS) $(RUN_LOGS)
	$(PY) -m sofar_assets.cli correct --csv $(DEMO_CORRECTIONS)
	$(DG) launch -m sofar_assets.definitions --assets raw_labels/label_corrections,sofar_dataset $(RUN_LOGS)
	$(DG) launch -m sofar_assets.definitions --assets field_accuracy --partition-range $(DEMO_DAYS) $(RUN_LOGS)

summary: install
	$(SOFAR) summary

# Headless Chromium against `dg dev` on a free port over the state `make run` left.
ui-check: install
	$(PY) scripts/ui_check.py

run: pipeline
	@$(MAKE) --no-print-directory summary

# .venv-bq: the local BigQuery emulator's own virtualenv (the BigQuery tests start it).
.venv-bq/.installed: scripts/bqemulator.sh
	bash scripts/bqemulator.sh
	@touch $@

# Debian's Chromium for the review page's browser test (Playwright drives it; no browser download).
# Installs it when missing: needs root (CI runs as root), or run the two apt-get commands with sudo.
chromium:
	@command -v chromium >/dev/null || { apt-get update -qq && apt-get install -y -qq chromium; }

test: install .venv-bq/.installed chromium
	$(PY) -m pytest -q

# Production for real on this machine: PostgreSQL, the MLflow server (basic auth), the GCS and
# BigQuery emulators, the Dagster webserver + daemon; train, a fanned-out backfill and one
# schedule tick submitted as the UI does; checked; everything stopped (scripts/prod_local.py).
prod-local: install .venv-bq/.installed
	$(PY) scripts/prod_local.py

# Only the tests that start real servers (also part of `make test`).
test-stack: install
	$(PY) -m pytest -q -m stack tests/test_stack.py

bench: install
	$(PY) bench/run_all.py

# the webserver behind a local-only guard (foreign Host / Origin / cross-site refused), and the daemon
ui: install demo-data
	$(PY) -m sofar_assets.stack.ui --host 127.0.0.1 --port 3000 -m sofar_assets.definitions

lint: install
	$(VENV)/bin/ruff check .

# docs/config.md from the config models' descriptions (tests/test_config_reference.py fails when stale)
docs: install
	$(PY) scripts/config_reference.py

bigquery-emulator: .venv-bq/.installed

clean:
	rm -rf .sofar dagster_home/storage dagster_home/history dagster_home/schedules dagster_home/logs
