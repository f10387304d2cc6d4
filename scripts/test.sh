#!/usr/bin/env bash
# The whole suite: lint, types, then pytest. pytest's exit 5 (no tests collected) is a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p test-output
.venv/bin/ruff check src tests || exit 1
.venv/bin/mypy || exit 1
.venv/bin/python -m pytest -ra --durations=25 --junitxml=test-output/junit.xml "$@"
rc=$?
if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
exit "$rc"
