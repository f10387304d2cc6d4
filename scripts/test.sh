#!/usr/bin/env bash
# The whole suite: lint, types, then pytest. pytest's exit 5 (no tests collected) is a failure.
# With no arguments (make test): the main pass, then a pass of the OpenSSH, recording, hardening, escape,
# systemd-init and realism tests with every honeypot on the nspawn backend (SANDTRAP_TEST_BACKEND=nspawn; the
# conformance suite and test_nspawn*.py run on nspawn in the main pass); SANDTRAP_TEST_LANES=1 runs the micro-VM
# tests and the nspawn pass in a lane beside the rest (below). With arguments, only pytest with them.
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

if [ "${SANDTRAP_TEST_LANES:-0}" != 1 ]; then
    # One pass after the other (the default): about 33 minutes on 2 cores.
    pytest_pass test-output/junit.xml
    rc=$?
    nspawn_pass
    nspawn_rc=$?
    if [ "$rc" != 0 ]; then exit "$rc"; fi
    exit "$nspawn_rc"
fi

# SANDTRAP_TEST_LANES=1: two lanes at once (2 cores; the VM lane is mostly QEMU under TCG on one of them, the main
# lane mostly waits on boxes, clients and servers): the micro-VM tests then the nspawn pass, beside every other
# test; about 22 minutes. Each lane is its own pytest run with its own JUnit file; the VM lane's output is printed
# after the main lane's. Not the default: the timing checks of one lane (the CPU burner's responsiveness) can
# fail under the other's load.
VM_TESTS=(tests/integration/test_microvm*.py tests/integration/test_sandbox_suite_microvm.py
    tests/realism/test_battery_microvm.py)
vm_lane() {
    pytest_pass test-output/junit-microvm.xml -p no:cacheprovider "${VM_TESTS[@]}"
    local vm_rc=$?
    nspawn_pass -p no:cacheprovider
    local nspawn_rc=$?
    [ "$vm_rc" = 0 ] && [ "$nspawn_rc" = 0 ]
}
mkdir -p /tmp/sandtrap-vm-lane  # its pytest temporary directories apart from the main lane's
SANDTRAP_TEST_LANE=vm PYTEST_DEBUG_TEMPROOT=/tmp/sandtrap-vm-lane vm_lane > test-output/lane-vm.log 2>&1 &
vm_pid=$!
ignore=()
for f in "${VM_TESTS[@]}"; do ignore+=("--ignore=$f"); done
pytest_pass test-output/junit.xml "${ignore[@]}"
rc=$?
echo "== the micro-VM lane (its tests, then the nspawn pass), run alongside: waiting for it"
wait "$vm_pid"
vm_rc=$?
cat test-output/lane-vm.log
echo "== main lane: exit $rc; micro-VM and nspawn lane: exit $vm_rc"
if [ "$rc" != 0 ]; then exit "$rc"; fi
exit "$vm_rc"
