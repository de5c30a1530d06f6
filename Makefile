# The two commands: `make run` starts the service, `make test` proves it. Both install what
# they need into .venv first, so they work on a fresh machine with only python3.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint interop-tools proto migrations bench clean

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
# Two workers: most tests wait on server processes (four are slower on two cores).
test: lint interop-tools
	$(BIN)/pytest -q -n 2

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

## The device-side tools tests/interop drives: libcoap's coap-client-openssl and the openssl CLI.
## Whichever is missing is installed with apt-get where that works (as root, or with sudo that
## needs no password); anywhere else this only prints a note and those tests skip (CI=true makes
## them fail instead, see .ci/run), so `make test` still runs everything else.
## --no-upgrade: a package already there (openssl, libssl3) is never upgraded as a side effect.
interop-tools:
	@packages=""; \
	command -v coap-client-openssl >/dev/null 2>&1 || packages="libcoap3-bin"; \
	command -v openssl >/dev/null 2>&1 || packages="$${packages:+$$packages }openssl"; \
	if [ -z "$$packages" ]; then \
		exit 0; \
	fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
		echo "note: no apt-get here; install $$packages (coap-client-openssl, openssl)" \
			"yourself, or tests/interop will skip"; \
		exit 0; \
	fi; \
	if [ "$$(id -u)" = 0 ]; then \
		sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
		sudo="sudo -n"; \
	else \
		echo "note: not root and no password-less sudo; run 'sudo apt-get install" \
			"$$packages', or tests/interop will skip"; \
		exit 0; \
	fi; \
	echo "installing $$packages for tests/interop"; \
	{ $$sudo apt-get update -qq && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-upgrade \
			--no-install-recommends $$packages; } \
		|| echo "note: apt-get could not install $$packages; tests/interop will skip"

## Regenerate the gRPC code from proto/citytwin/v1/*.proto.
proto: $(STAMP)
	$(BIN)/python proto/generate.py

## Write a migration for model changes (then commit it; it is applied on start).
migrations: $(STAMP)
	$(BIN)/tortoise -c twin.database.MIGRATIONS_CONFIG makemigrations

bench: $(STAMP)
	$(BIN)/python bench/twin_updates.py
	$(BIN)/python bench/enroll.py
	$(BIN)/python bench/device_reports.py
	$(BIN)/python bench/desired_push.py
	$(BIN)/python bench/connections.py
	$(BIN)/python bench/ota.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
