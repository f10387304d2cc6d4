"""The detection battery (battery.py) against sandtrap with ``sandbox.backend: microvm`` (TCG here): two VMs, each
connection's session the guest's own sshd. The plain column is the same hardened container as in test_battery.py.

Box A and box B are two VMs (affinity session, a pool of two and no more: nothing else boots while the battery
runs). Only 127.0.0.1 is contacted; the VMs' network is their tap in a namespace of their own.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from battery import (
    CHECKS,
    MICROVM_TIMING,
    Check,
    Outcome,
    checks_for_microvm,
    expected_here,
    key,
    markdown,
    outcome,
    side_by_side,
)
from test_battery import DockerTarget, SshTarget, connect, run_battery, started, table, vars_of

from sandtrap.app import running
from sandtrap.config import SandboxSettings, Settings, merge
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.microvm import qemu

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = "10.20.1.1"  # network.subnet's .1, the host side of each VM's tap
DATA = ROOT / "data" / "microvm-test"  # the image of tests/integration/test_microvm*.py (same keys, same inputs)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1800),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace and tap need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
]


def _settings() -> Settings:
    base: dict[str, Any] = {
        "sensor": f"vmrelay-{secrets.token_hex(3)}",  # a capture gateway namespace of its own
        "storage": {"data_dir": str(DATA)},
        "image": {"cache_dir": str(ROOT / "data" / "cache")},
        "ssh": {"listen": "127.0.0.1:0"},
        "api": {"listen": "127.0.0.1:0"},
        "sandbox": {
            "backend": "microvm",
            "microvm": {"memory": "512m", "vcpus": 1},
            "affinity": "session",  # box A and box B: two VMs (source_ip, the default, would give one)
            "pool_size": 2,
            "pool_max": 2,
            "max_sandboxes": 2,
        },
        "auth": {
            "credentials": [{"username": "root", "password": "hunter2"}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    return Settings.model_validate(merge(base, {}))


async def test_detection_battery_microvm(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    output_dir: Path,
) -> None:
    vms = DATA / "microvm" / "vms"
    try:
        async with running(_settings()) as services:  # returns once both VMs are warm
            conn_a = await connect(services.ssh.port)
            conn_b = await connect(services.ssh.port, wrong_first=True)
            try:
                # A client on loopback reaches the guest's sshd from the tap's host side, with its own port
                # (README "Micro-VMs"): that is the client address a login in the guest sees.
                a, b = SshTarget(conn_a), SshTarget(conn_b)
                a.ctx = replace(a.ctx, client_ip=GATEWAY)
                b.ctx = replace(b.ctx, client_ip=GATEWAY)
                ours = await run_battery(a, b)
            finally:
                conn_a.close()
                conn_b.close()
    finally:
        for directory in vms.iterdir() if vms.exists() else ():
            shutil.rmtree(directory, ignore_errors=True)
    assert not [n for n, pid in qemu.find_qemus("sandtrap-vm-").items() if str(DATA) in _cmdline(pid)]

    plain_backend = backend_factory(
        sandbox_settings(docker={"cgroupns": "host"}, lxcfs_dir="", loadavg_dir="", init="sandtrap")
    )
    p1, p2 = await asyncio.gather(started(plain_backend), started(plain_backend))
    t1, t2 = DockerTarget(p1), DockerTarget(p2)
    try:
        plain = await run_battery(t1, t2)
    finally:
        await t1.close()
        await t2.close()

    rows: list[tuple[Check, Outcome, Outcome]] = []
    for check in checks_for_microvm():
        plain_result = None if check.needs_ssh else plain[key(check)]
        rows.append((check, outcome(check, ours[key(check)]), outcome(check, plain_result)))
    print("\n" + table(rows))
    (output_dir / "realism-battery-microvm.md").write_text(markdown(rows), encoding="utf-8")
    docker = output_dir / "realism-battery.md"  # test_battery.py's run with every option on (README's table)
    if docker.exists():
        both = side_by_side(docker.read_text(encoding="utf-8"), markdown(rows))
        (output_dir / "realism-battery-backends.md").write_text(both, encoding="utf-8")
    raw = {key(c): {"sandtrap": vars_of(ours[key(c)]), "plain": vars_of(plain[key(c)])} for c in CHECKS}
    (output_dir / "realism-battery-microvm-raw.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")

    wrong = {
        key(check): (ours_outcome, expected_here(check, plain_outcome), ours[key(check)].out[-300:])
        for check, ours_outcome, plain_outcome in rows
        if (ours_outcome == "pass") != (expected_here(check, plain_outcome) == "pass")
        and check.id not in MICROVM_TIMING
    }
    assert not wrong, "microvm's outcomes differ from battery.py's expectations (checks_for_microvm)"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
