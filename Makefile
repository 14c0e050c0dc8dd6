# The two commands a newcomer needs: `make demo` and `make test`. Both do their own set-up.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= localcluster,operator,train,merge,cli,dev
STAMP := $(VENV)/.installed-$(shell echo '$(EXTRAS)' | tr ',' '-')

.PHONY: help venv binaries up down env status demo lint unit cluster test clean

help:
	@echo "make demo    bring up the local cluster and S3 server, run a job, then train and merge contributions"
	@echo "make test    lint, type-check, unit tests, then cluster tests (builds what it needs)"
	@echo "make up|down|env|status   drive the local cluster by hand"

# The virtual environment is rebuilt only when pyproject.toml changes; pip keeps its own cache.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	@rm -f $(VENV)/.installed-*
	@touch $@

venv: $(STAMP)

binaries: venv
	$(BIN)/medforge localcluster build

up: venv
	$(BIN)/medforge localcluster up

down: venv
	$(BIN)/medforge localcluster down

env: venv
	@$(BIN)/medforge localcluster env

status: venv
	$(BIN)/medforge localcluster status

demo: venv
	$(BIN)/python -m medforge_localcluster.demo

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

unit: venv
	$(BIN)/pytest -m unit -q

cluster: venv binaries
	$(BIN)/pytest -m cluster -q

test: lint unit cluster

clean:
	-$(BIN)/medforge localcluster down
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
