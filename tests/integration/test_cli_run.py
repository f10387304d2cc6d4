"""`sandtrap run` started as a user starts it (issue 14, item 6): ``-c F`` after or before the command, F's
``storage.data_dir`` a new empty directory, the real engine and image, and one login with the real OpenSSH client.

sandtrap's seccomp profile comes from where the set-up installed it for every data dir (nothing is copied
into the new data dir), and what the login left is read back with ``sandtrap sessions list -c F``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sandtrap.sandbox.docker import seccomp

from helpers import remove_sensor_containers
from sandtrap_fixtures import INIT, NETWORK, SESSION_TRANSPORT
from sshclient import HOST, PASSWORD, USER, free_port, run, ssh_argv

pytestmark = pytest.mark.timeout(240)


def write_config(path: Path, sensor: str, image: str, port: int, data_dir: Path) -> None:
    config = {
        "sensor": sensor,
        "ssh": {"listen": f"{HOST}:{port}"},
        "sandbox": {
            "docker": {"image": image},
            "pool_size": 1,
            "session_transport": SESSION_TRANSPORT,
            "init": INIT,
        },
        "network": {"mode": NETWORK},
        "storage": {"data_dir": str(data_dir)},
        "api": {"listen": f"{HOST}:{free_port()}"},
        "auth": {
            "credentials": [{"username": USER, "password": PASSWORD}],
            "accept_all_after": 0,
            "failure_delay_s": 0,
            "success_delay_s": 0,
        },
    }
    path.write_text(yaml.safe_dump(config), encoding="utf-8")


def sandtrap(*argv: str) -> list[str]:
    return [sys.executable, "-m", "sandtrap.cli", *argv]


async def wait_running(proc: asyncio.subprocess.Process, log: Path, timeout_s: float = 120.0) -> None:
    """Until the log says the honeypot runs (its pool warm, SSH listening); fails with the log if it exits."""
    async with asyncio.timeout(timeout_s):
        while "sandtrap running" not in log.read_text(errors="replace"):
            assert proc.returncode is None, f"sandtrap exited {proc.returncode}:\n{log.read_text(errors='replace')}"
            await asyncio.sleep(0.2)


@pytest.mark.parametrize("where", ["after", "before"])
async def test_run_with_config_before_or_after_and_a_fresh_data_dir_serves_a_login(
    tmp_path: Path, built_image: str, sensor: str, where: str
) -> None:
    data_dir = tmp_path / "fresh" / "data"  # not there yet: nothing of a set-up in it
    config = tmp_path / "sandtrap.yaml"
    port = free_port()
    write_config(config, sensor, built_image, port, data_dir)
    argv = ["run", "-c", str(config)] if where == "after" else ["-c", str(config), "run"]
    log = tmp_path / "sandtrap.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *sandtrap(*argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "400"},
        )
    try:
        await wait_running(proc, log)
        login = await run(ssh_argv(port, "echo logged-in-as-$(id -un)"))
        assert (login.returncode, login.out.strip()) == (0, f"logged-in-as-{USER}"), login.err
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(60):
            await proc.wait()
        assert proc.returncode == 0, log.read_text(errors="replace")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        await remove_sensor_containers(sensor)
    text = log.read_text(errors="replace")
    assert f"sandbox.docker.seccomp_profile: sandtrap, from {seccomp.installed_path()}" in text, text
    assert not seccomp.profile_path(data_dir).exists()  # found where the set-up put it, not copied
    assert (data_dir / "sandtrap.db").exists()

    listed = await asyncio.to_thread(
        subprocess.run, sandtrap("sessions", "list", "--json", "-c", str(config)), capture_output=True, timeout=60
    )
    assert listed.returncode == 0, listed.stderr.decode()
    rows = [json.loads(line) for line in listed.stdout.decode().splitlines()]
    assert [(r["username"], r["login_success"], r["commands_count"]) for r in rows] == [(USER, True, 1)]
