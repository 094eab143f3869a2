# Cos4Cloud suite. `make run` starts everything in one process; `make test` checks it all.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COMPONENTS := shared gateway svc-ingest svc-quality svc-video svc-plantid svc-mobis
STAMP := $(VENV)/.installed

.PHONY: install run up up-env key test lint format pytest bench clean

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
## UP_ENV: honcho env files, comma-separated, later ones win (UP_ENV=$(UP_ENV),mine.env).
UP_ENV ?= deploy/local/distributed.env
up_env_missing = $(filter-out $(wildcard $(subst $(comma), ,$(UP_ENV))),$(subst $(comma), ,$(UP_ENV)))
comma := ,
up key: up-env
up-env:
	@$(if $(up_env_missing),echo "UP_ENV names no such file: $(up_env_missing)" >&2; exit 1,true)

up: install
	$(VENV)/bin/honcho --procfile deploy/local/Procfile --env $(UP_ENV) start

## An API key for the suite `make up` runs (in its gateway's database), printed once.
key: install
	@$(VENV)/bin/honcho --env $(UP_ENV) run deploy/local/run python -m c4c.gateway keys create --name "$${NAME:-$$USER}" --scopes '*'

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
