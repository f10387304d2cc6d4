# sandtrap: `make run` and `make test` each run the idempotent set-up first.
.PHONY: setup setup-test setup-compose run test unit lint typecheck bench clean compose-up compose-down

PYTEST_ARGS ?=
BENCH_ARGS ?=

setup:
	@bash scripts/setup.sh run

setup-test:
	@bash scripts/setup.sh test

setup-compose:
	@bash scripts/setup.sh compose

run: setup
	.venv/bin/sandtrap run

# The Compose deployment (README "Compose"): honeypot and engine proxy in containers. compose-down keeps the
# volumes (data, logs, database); COMPOSE_DOWN_ARGS=--volumes removes them too.
COMPOSE_DOWN_ARGS ?=
compose-up: setup-compose
	bash deploy/compose.sh up

compose-down:
	bash deploy/compose.sh down $(COMPOSE_DOWN_ARGS)

test: setup-test
	bash scripts/test.sh $(PYTEST_ARGS)

unit:
	.venv/bin/python -m pytest -q tests/unit

lint:
	.venv/bin/ruff check src tests

typecheck:
	.venv/bin/mypy

# Benchmarks against OpenSSH and Cowrie (bench/README.md): results in bench/results/. BENCH_ARGS=--quick for a smoke run.
bench: setup
	bash bench/setup.sh
	.venv/bin/python -m bench $(BENCH_ARGS)
	.venv/bin/python -m bench.services $(BENCH_ARGS)
	.venv/bin/python -m bench.capture $(BENCH_ARGS)
	.venv/bin/python -m bench.capacity $(BENCH_ARGS)
	.venv/bin/python -m bench.microvm $(BENCH_ARGS)
	.venv/bin/python -m bench.microvm_restore $(BENCH_ARGS)
	.venv/bin/python -m bench.backends_side_by_side $(BENCH_ARGS)

clean:
	rm -rf .venv .pytest_cache .mypy_cache .ruff_cache
