#!/usr/bin/env bash
# The whole suite: lint, types, then pytest. pytest's exit 5 (no tests collected) is a failure.
# With no arguments (make test), about 26 minutes on 2 cores:
#   1. two lanes at once: the micro-VM tests (mostly QEMU under TCG on one core) beside every other test but the
#      `timing` ones (test latency or throughput: another lane's load could fail them);
#   2. alone: the `timing` tests, then a pass of the OpenSSH, recording, hardening, escape, systemd-init and
#      realism tests with every honeypot on the nspawn backend (SANDTRAP_TEST_BACKEND=nspawn; the conformance
#      suite and test_nspawn*.py run on nspawn in the main lane).
# SANDTRAP_TEST_LANES=0: every pass one after the other instead (about 33 minutes). With arguments, only pytest
# with them.
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
NSPAWN_TESTS=(tests/integration/test_ssh_openssh.py tests/integration/test_recording.py
    tests/integration/test_hardening.py tests/integration/test_escape.py tests/integration/test_systemd_init.py
    tests/realism/test_battery.py)
nspawn_pass() {
    echo "== the same SSH, recording, hardening, escape, systemd-init and realism tests on the nspawn backend (issue 18)"
    SANDTRAP_TEST_BACKEND=nspawn pytest_pass test-output/junit-nspawn.xml "$@" "${NSPAWN_TESTS[@]}"
}

VM_TESTS=(tests/integration/test_microvm*.py tests/integration/test_sandbox_suite_microvm.py
    tests/realism/test_battery_microvm.py)

if [ "${SANDTRAP_TEST_LANES:-1}" = 0 ]; then
    pytest_pass test-output/junit.xml
    rc=$?
    nspawn_pass
    nspawn_rc=$?
    if [ "$rc" != 0 ]; then exit "$rc"; fi
    exit "$nspawn_rc"
fi

# 1. Two lanes, each its own pytest run with its own JUnit file and temporary directories; the VM lane's output is
# printed after the main lane's.
mkdir -p /tmp/sandtrap-vm-lane
SANDTRAP_TEST_LANE=vm PYTEST_DEBUG_TEMPROOT=/tmp/sandtrap-vm-lane \
    pytest_pass test-output/junit-microvm.xml -p no:cacheprovider "${VM_TESTS[@]}" > test-output/lane-vm.log 2>&1 &
vm_pid=$!
ignore=()
for f in "${VM_TESTS[@]}"; do ignore+=("--ignore=$f"); done
pytest_pass test-output/junit.xml -m "not timing" "${ignore[@]}"
rc=$?
echo "== the micro-VM lane, run alongside: waiting for it"
wait "$vm_pid"
vm_rc=$?
cat test-output/lane-vm.log
# 2. Alone.
echo "== the timing tests, alone"
SANDTRAP_TEST_LANE=timing pytest_pass test-output/junit-timing.xml -m timing "${ignore[@]}"
timing_rc=$?
nspawn_pass
nspawn_rc=$?
echo "== main lane: exit $rc; micro-VM lane: exit $vm_rc; timing: exit $timing_rc; nspawn: exit $nspawn_rc"
for code in "$rc" "$vm_rc" "$timing_rc" "$nspawn_rc"; do
    if [ "$code" != 0 ]; then exit "$code"; fi
done
exit 0
