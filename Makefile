# One entry point for users, developers and CI. Every target builds the project's
# virtual environment first (the newest Python 3.11+ on PATH), so a fresh clone
# needs nothing else.
PYTHON ?= $(shell for v in 3.15 3.14 3.13 3.12 3.11 3; do p=$$(command -v python$$v) && $$p -c 'import sys; assert sys.version_info >= (3, 11)' >/dev/null 2>&1 && { echo $$p; break; }; done)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test mutations lint format bench broker-start broker-stop clean

# The pinned versions of requirements.lock (scripts/lock.sh regenerates it), then the
# project itself without resolving anything again; pip check: the lock is consistent.
$(STAMP): pyproject.toml requirements.lock
	@test -n "$(PYTHON)" || { echo "error: no Python 3.11 or newer on PATH (python3.11 ... python3.15, or python3)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e '.[test,plots]'
	$(BIN)/python -m pip check
	@touch $(STAMP)

## demo: start a local Kafka (unless KAFKA_BOOTSTRAP_SERVERS is set), a worker and the simulator
demo: $(STAMP)
	$(BIN)/efficacy demo

## test: the whole test suite against a real Apache Kafka broker (started locally unless configured)
test: $(STAMP)
	bash scripts/install-prometheus.sh
	bash scripts/install-chromium.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

## mutations: apply each deliberately wrong implementation (tests/mutations/) and check its tests fail
mutations: $(STAMP)
	$(BIN)/python scripts/mutations.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

## bench: the accuracy and cost benchmarks (minutes; not part of `make test`)
bench: $(STAMP)
	nice -n 10 $(BIN)/python -m benchmarks.fidelity
	nice -n 10 $(BIN)/python -m benchmarks.population_cost

broker-start: $(STAMP)
	$(BIN)/python -m cli.broker start

broker-stop: $(STAMP)
	$(BIN)/python -m cli.broker stop

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache
