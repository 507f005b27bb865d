# Every target creates what it needs: a fresh clone only needs python3 (>= 3.11), and for `make test`
# Java 17 + Maven (Kafka) and apt (Debian packages of the real clients and servers).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# setup.py builds the C fast paths (src/tb_gateway/_speedups.c, _lanes.c, _mqtt_lane.c, _kafka_lane.c, _seen.c): a change to them reinstalls, which rebuilds them
BUILD  := pyproject.toml setup.py src/tb_gateway/_speedups.c src/tb_gateway/_lanes.c src/tb_gateway/_mqtt_lane.c \
          src/tb_gateway/_kafka_lane.c src/tb_gateway/_seen.c src/tb_gateway/_speedups.h
STAMP  := $(VENV)/.installed-$(shell cat $(BUILD) | sha1sum | cut -c1-12)
# with a C compiler the fast paths must build: a failed compile stops the install instead of leaving the
# previous module in place (setup.py); without one the gateway runs the same rules in Python
SPEEDUPS := $(if $(shell command -v cc 2>/dev/null),required,optional)

.PHONY: install run test lint bench deps clean format

$(STAMP): $(BUILD)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	TB_GATEWAY_SPEEDUPS=$(SPEEDUPS) $(BIN)/pip install -q -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

# The install step alone: what `run` needs, and what the Dockerfile runs (tests/test_docker.py checks they match).
install: $(STAMP)

# The gateway on the embedded default: no Kafka, Redis or ThingsBoard needed (override with KAFKA_ENABLED=true).
run: $(STAMP)
	KAFKA_ENABLED=$${KAFKA_ENABLED:-false} $(BIN)/tb-gateway run

# Everything the tests use: Debian packages, the Kafka jars, the SDK's own virtualenv.
deps: $(STAMP)
	bash scripts/system-deps.sh
	bash scripts/tb-sdk-venv.sh
	$(BIN)/python -m tests.harness.kafka fetch

lint: $(STAMP)
	$(BIN)/ruff check src tests bench setup.py
	$(BIN)/ruff format --check src tests bench setup.py
	$(BIN)/mypy

test: deps lint
	$(BIN)/pytest -p no:cacheprovider $(PYTEST_ARGS)

bench: deps
	$(BIN)/python -m bench $(BENCH_ARGS)

format: $(STAMP)
	$(BIN)/ruff format src tests bench
	$(BIN)/ruff check --fix src tests bench

clean:
	rm -rf $(VENV) .cache build *.egg-info src/tb_gateway/*.so
