# Two commands matter: `make run` and `make test`. Everything else serves them.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint lock test-faults test-docker bench bench-smoke clean redis-server chromium wrk

# Dependencies come from the lock file (exact versions, hashes checked); pyproject.toml keeps
# the ranges the code supports. `make lock` re-resolves both lock files from those ranges.
$(STAMP): pyproject.toml requirements-dev.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

lock: $(STAMP)
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links -o requirements.lock pyproject.toml
	$(BIN)/pip-compile --quiet --strip-extras --generate-hashes --allow-unsafe --no-emit-index-url --no-emit-find-links --extra dev -o requirements-dev.lock pyproject.toml

# The tests start their own redis-server process; install one when the machine has none.
redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "redis-server not on PATH: installing Debian's redis-server package"; \
	  (apt-get update -qq && apt-get install -y -qq redis-server) >/dev/null || \
	  { echo "could not install redis-server: install it and retry" >&2; exit 1; }; }

# The console's browser tests drive Debian's chromium through its chromium-driver (selenium is
# given /usr/bin/chromedriver, so it never downloads a browser or a driver of its own).
chromium:
	@{ test -x /usr/bin/chromium && test -x /usr/bin/chromedriver; } || { \
	  echo "chromium or chromedriver missing: installing Debian's chromium and chromium-driver packages"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null || \
	  { echo "could not install chromium: install chromium and chromium-driver and retry" >&2; exit 1; }; }

run: $(STAMP) redis-server
	$(BIN)/hrflow-webhooks run

test: $(STAMP) redis-server chromium lint
	$(BIN)/python -m pytest

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

test-faults: $(STAMP) redis-server
	$(BIN)/python -m pytest -m slow -s

# The production image built and run in real containers (tests/docker/smoke.py). As root:
# it installs docker.io and starts dockerd when missing, and builds a local Debian base
# when the registry is unreachable.
test-docker: $(STAMP) redis-server
	$(BIN)/python -m tests.docker.smoke

# P1's load generator is wrk (Debian's package), installed like redis-server.
wrk:
	@command -v wrk >/dev/null 2>&1 || { \
	  echo "wrk not on PATH: installing Debian's wrk package"; \
	  (apt-get update -qq && apt-get install -y -qq wrk) >/dev/null || \
	  { echo "could not install wrk: install it and retry" >&2; exit 1; }; }

bench: $(STAMP) redis-server wrk
	$(BIN)/python -m bench

bench-smoke: $(STAMP) redis-server wrk
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
