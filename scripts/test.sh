#!/usr/bin/env bash
# The whole suite: lint, types, then pytest. pytest's exit 5 (no tests collected) is a failure.
# With no arguments (make test), a second pass runs the OpenSSH, recording, hardening, escape, systemd-init and realism tests
# again with every honeypot on the nspawn backend (SANDTRAP_TEST_BACKEND=nspawn; the conformance suite and
# test_nspawn*.py run on nspawn in the first pass). With arguments, only pytest with them.
set -uo pipefail
cd "$(dirname "$0")/.."
mkdir -p test-output
.venv/bin/ruff check src tests || exit 1
.venv/bin/mypy || exit 1

pytest_pass() {  # pytest_pass JUNIT ARGS...: pytest's exit status, 5 (nothing collected) made a failure
    local junit=$1
    shift
    .venv/bin/python -m pytest -ra --durations=25 --junitxml="$junit" "$@"
    local rc=$?
    if [ "$rc" = 5 ]; then echo "pytest collected no tests: failing" >&2; return 1; fi
    return "$rc"
}

if [ "$#" -gt 0 ]; then
    pytest_pass test-output/junit.xml "$@"
    exit $?
fi
pytest_pass test-output/junit.xml
rc=$?
echo "== the same SSH, recording, hardening, escape, systemd-init and realism tests on the nspawn backend (issue 18)"
SANDTRAP_TEST_BACKEND=nspawn pytest_pass test-output/junit-nspawn.xml \
    tests/integration/test_ssh_openssh.py \
    tests/integration/test_recording.py tests/integration/test_hardening.py tests/integration/test_escape.py \
    tests/integration/test_systemd_init.py tests/realism/test_battery.py
nspawn_rc=$?
if [ "$rc" != 0 ]; then exit "$rc"; fi
exit "$nspawn_rc"
