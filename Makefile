# Cos4Cloud suite. `make run` starts everything in one process; `make test` checks it all.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COMPONENTS := shared gateway svc-ingest svc-quality svc-video svc-plantid svc-mobis
STAMP := $(VENV)/.installed

.PHONY: install run up test lint format pytest bench clean

install: $(STAMP)

# Re-install when any component's dependencies change.
$(STAMP): $(foreach c,$(COMPONENTS),$(c)/pyproject.toml) requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt $(foreach c,$(COMPONENTS),-e ./$(c))
	touch $@

## Embedded mode: gateway + all services in one process, SQLite, in-process bus, ./data.
run: install
	$(PY) -m c4c.gateway

## Distributed mode: one process per service, RabbitMQ and PostgreSQL (see README).
up: install
	$(VENV)/bin/honcho --procfile deploy/local/Procfile --env deploy/local/distributed.env start

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

pytest: install
	$(PY) -m pytest

test: lint pytest

bench: install
	$(PY) -m bench

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
