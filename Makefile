# Cos4Cloud suite. `make run` starts everything in one process; `make test` checks it all.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
COMPONENTS := shared gateway svc-ingest svc-quality svc-video svc-plantid svc-mobis
STAMP := $(VENV)/.installed

.PHONY: install lock run up up-env key test lint format pytest bench clean

install: $(STAMP)

# Re-install when any component's dependencies change. Every release is the one
# constraints.txt names: each clone, CI and image gets the set the tests passed with.
$(STAMP): $(foreach c,$(COMPONENTS),$(c)/pyproject.toml) requirements-dev.txt constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -r requirements-dev.txt $(foreach c,$(COMPONENTS),-e ./$(c))
	touch $@

## constraints.txt anew: the newest releases the components' and dev requirements allow,
## resolved in a new venv. Run it to take upgrades, then `make test`, then commit the file.
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install --quiet -r requirements-dev.txt $(foreach c,$(COMPONENTS),-e ./$(c))
	{ echo "# Made by \`make lock\` ($$($(LOCK_VENV)/bin/python -V), $$(uname -m)); \`make install\` and the images install these."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable; } > constraints.txt
	rm -rf $(LOCK_VENV)

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
