# Thin wrappers over `uv run …`; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

UV := $(shell command -v uv 2>/dev/null || echo $(HOME)/.local/bin/uv)
export PATH := $(HOME)/.local/bin:$(PATH)

.PHONY: help uv sync services migrate run demo clean cli test test-fast test-unit test-tools lint fmt bench fuzz compose-test

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-13s %s\n", $$1, $$2}'

uv: ## install uv with pip when it is missing
	@command -v uv >/dev/null 2>&1 || python3 -m pip install --quiet --user uv || python3 -m pip install --quiet uv

sync: uv ## install the locked dependencies
	@uv sync --frozen --quiet

services: sync ## make sure PostgreSQL, Redis and RabbitMQ answer; create the database
	@scripts/services.sh

migrate: services ## apply the migrations to POSTGRES_DB
	@uv run --frozen alembic upgrade head

run: migrate ## serve on HOST:PORT with WORKERS processes; prints the URLs once ready
	@ORDERS_API_BANNER=1 uv run --frozen python -m api

demo: sync ## seed a user, an admin and a few orders through the running API; print tokens
	@uv run --frozen python -m api.cli demo

clean: sync ## drop the database, Redis keys under the prefix, RabbitMQ names (YES=1: no prompt)
	@uv run --frozen python -m api.cli clean $(if $(filter 1,$(YES)),--yes,)

cli: sync ## an operator command: make cli ARGS='promote-admin ada@example.com'
	@uv run --frozen python -m api.cli $(ARGS)

lint: sync ## ruff check, ruff format --check, mypy (strict on api/)
	@uv run --frozen ruff check .
	@uv run --frozen ruff format --check .
	@uv run --frozen mypy

fmt: sync ## format and autofix
	@uv run --frozen ruff format .
	@uv run --frozen ruff check --fix .

test-tools: ## the private servers' binaries the suite needs (installs PgBouncer when missing)
	@scripts/test-tools.sh

# The second run: the database modules again, through a private PgBouncer (transaction mode).
PGBOUNCER_MODULES := tests/test_orders.py tests/test_idempotency.py tests/test_events.py

test: services test-tools lint ## lint, then the whole suite (and the database modules through PgBouncer)
	@uv run --frozen pytest
	@uv run --frozen pytest --postgres-via=pgbouncer -m "not faults" $(PGBOUNCER_MODULES)

# What the edit-run loop skips besides the fault tests: the fuzzing, and the modules that
# start private clusters or whole service processes (make test runs them all).
SLOW_MODULES := tests/test_schemathesis.py tests/test_rabbitmq_cluster.py tests/test_redis_topologies.py \
	tests/test_postgres_cluster.py tests/test_first_hour.py

test-fast: services lint ## lint, then the suite less faults, fuzzing and private clusters (edit-run loop)
	@uv run --frozen pytest -m "not faults" $(addprefix --ignore=,$(SLOW_MODULES))

test-unit: sync ## the unit layer alone (tests/unit): pure code, no services, seconds
	@uv run --frozen pytest tests/unit -q

bench: services ## the benchmark: wrk against the service and a reference app (SOAK=600: the soak instead)
	@uv sync --frozen --quiet --group bench
	@BENCH_SOAK=$${BENCH_SOAK:-$(SOAK)} uv run --frozen --group bench python -m bench

fuzz: services ## Schemathesis, FUZZ_EXAMPLES (default 500) examples per operation and phase
	@FUZZ_EXAMPLES=$${FUZZ_EXAMPLES:-500} uv run --frozen pytest tests/test_schemathesis.py -q --timeout 1800

compose-test: ## build the image, run the compose stack, place an order end to end, tear down
	@scripts/compose-test.sh
