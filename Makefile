# The two commands: `make run` starts the service, `make test` proves it. Both install what
# they need into .venv first, so they work on a fresh machine with only python3.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint proto migrations bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## Start the service on its embedded default: SQLite under ./var (or $CITYTWIN_HOME),
## gRPC on 127.0.0.1:50051, CoAP on UDP 5683.
run: $(STAMP)
	$(BIN)/citytwin serve

## Lint, type-check and run the whole test suite (PostgreSQL too when CITYTWIN_TEST_PG is set).
test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## Regenerate the gRPC code from proto/citytwin/v1/*.proto.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

## Write a migration for model changes (then commit it; it is applied on start).
migrations: $(STAMP)
	$(BIN)/tortoise -c twin.database.MIGRATIONS_CONFIG makemigrations

bench: $(STAMP)
	$(BIN)/python bench/twin_updates.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
