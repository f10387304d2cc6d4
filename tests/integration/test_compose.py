"""The Compose deployment (deploy/compose.yaml, README "Compose"; issue 20, part 1), brought up as `make compose-up`
does (deploy/compose.sh: the honeypot's image built with no registry, an engine proxy container, the honeypot
container) under a throw-away project name with its ports on 127.0.0.1, with the real engine and docker-compose.

One login through the container's published SSH port with OpenSSH's client; its command read back from the
container's database through its API with the token; the honeypot container holds no engine socket and the proxy
refuses, from inside the honeypot container, engine calls outside its allow-list. Taken down with its volumes in
``finally``, whatever happened.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from sandtrap.events import COMMAND_INPUT

from helpers import remove_sensor_containers
from sshclient import HOST, PASSWORD, USER, free_port, run, ssh_argv

pytestmark = pytest.mark.timeout(900)

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_SH = ROOT / "deploy" / "compose.sh"

# A request the honeypot never makes, sent from inside its container to the proxy's socket: the status line back.
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect("/run/sandtrap/engine.sock")
s.sendall(sys.argv[1].encode() + b" HTTP/1.1\\r\\nHost: docker\\r\\nContent-Length: 0\\r\\n\\r\\n")
print(s.recv(65536).split(b"\\r\\n", 1)[0].decode())
"""


@dataclass
class Deployment:
    sensor: str
    project: str
    env: dict[str, str]
    ssh_port: int
    api_port: int
    token: str
    timings: dict[str, float] = field(default_factory=dict)

    def api(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=f"http://{HOST}:{self.api_port}", headers={"Authorization": f"Bearer {self.token}"}, timeout=10
        )


async def sh(argv: list[str], env: dict[str, str], timeout_s: float) -> tuple[int, str]:
    """Run a command to completion; its exit status and its stdout and stderr together."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace") + f"\n(killed after {timeout_s} s)"
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


async def container_id(dep: Deployment, service: str) -> str:
    argv = ["docker-compose", "-p", dep.project, "-f", str(ROOT / "deploy" / "compose.yaml"), "ps", "-q", service]
    rc, out = await sh(argv, dep.env, 60)
    assert rc == 0 and out.strip(), out
    return out.strip().splitlines()[-1]


async def inspect(ident: str) -> dict[str, Any]:
    rc, out = await sh(["docker", "inspect", ident], dict(os.environ), 30)
    assert rc == 0, out
    info: dict[str, Any] = json.loads(out)[0]
    return info


@pytest.fixture
async def deployment(sensor: str, built_image: str, tmp_path: Path, output_dir: Path) -> AsyncIterator[Deployment]:
    config = yaml.safe_load((ROOT / "deploy" / "sandtrap.yaml").read_text(encoding="utf-8"))
    config["sensor"] = sensor
    config["sandbox"]["pool_size"] = 1
    config["sandbox"]["docker"]["image"] = built_image
    config["auth"] = {
        "credentials": [{"username": USER, "password": PASSWORD}],
        "accept_all_after": 0,
        "failure_delay_s": 0,
        "success_delay_s": 0,
    }
    path = tmp_path / "sandtrap.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    path.chmod(0o644)  # read in the containers by root (the proxy) and by the honeypot's own user
    tmp_path.chmod(0o755)
    dep = Deployment(
        sensor=sensor,
        project=f"sandtrap-{sensor}",
        env={},
        ssh_port=free_port(),
        api_port=free_port(),
        token=secrets.token_hex(16),
    )
    dep.env = dict(os.environ) | {
        "SANDTRAP_COMPOSE_PROJECT": dep.project,
        "SANDTRAP_COMPOSE_CONFIG": str(path),
        "SANDTRAP_HONEYPOT_IMAGE": f"{built_image.rsplit(':', 1)[0]}-honeypot:latest",
        "SANDTRAP_VENV": sys.prefix,  # this interpreter's virtualenv: its pip and its installed seccomp profile
        "SANDTRAP_SSH_BIND": HOST,
        "SANDTRAP_SSH_PORT": str(dep.ssh_port),
        "SANDTRAP_API_BIND": HOST,
        "SANDTRAP_API_PORT": str(dep.api_port),
        "SANDTRAP_API_TOKEN": dep.token,
    }
    try:
        started = time.monotonic()
        rc, out = await sh(["bash", str(COMPOSE_SH), "up"], dep.env, 600)
        dep.timings["up (image current or built, containers started, API answering)"] = time.monotonic() - started
        assert rc == 0, f"compose.sh up failed ({rc}):\n{out[-4000:]}"
        yield dep
    finally:
        logs = ["docker-compose", "-p", dep.project, "-f", str(ROOT / "deploy" / "compose.yaml"), "logs"]
        _, out = await sh([*logs, "--no-color", "--tail", "200"], dep.env, 60)
        (output_dir / "compose-logs.txt").write_text(out, encoding="utf-8")
        started = time.monotonic()
        rc, out = await sh(["bash", str(COMPOSE_SH), "down", "--volumes"], dep.env, 300)
        dep.timings["down --volumes"] = time.monotonic() - started
        await remove_sensor_containers(sensor)  # the boxes the honeypot stopped and kept for forensics
        filters = ["--filter", f"label=com.docker.compose.project={dep.project}"]
        _, volumes = await sh(["docker", "volume", "ls", "-q", *filters], dep.env, 30)
        _, containers = await sh(["docker", "ps", "-aq", *filters], dep.env, 30)
        assert rc == 0, f"compose.sh down failed ({rc}):\n{out[-4000:]}"
        assert (volumes.strip(), containers.strip()) == ("", ""), "compose down left volumes or containers"
        lines = [f"compose deployment ({dep.project}): seconds per step"]
        lines += [f"  {name:<64} {seconds:6.1f}" for name, seconds in dep.timings.items()]
        (output_dir / "compose-timings.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
        print("\n".join(lines))


async def test_compose_deployment_serves_and_records_a_login(deployment: Deployment) -> None:
    dep = deployment
    marker = f"compose-{secrets.token_hex(4)}"

    # A login through the port the honeypot container publishes.
    started = time.monotonic()
    done = await run(ssh_argv(dep.ssh_port, f"echo {marker}; id -u"), timeout_s=180)
    dep.timings["ssh login and command"] = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().split() == [marker, "0"]

    # Its command, from the container's database, through the container's API with the token.
    started = time.monotonic()
    async with dep.api() as api:
        async with httpx.AsyncClient(base_url=api.base_url, timeout=10) as anonymous:
            assert (await anonymous.get("/api/v1/sessions")).status_code == 401  # the token is needed
        inputs: list[str] = []
        async with asyncio.timeout(60):
            while marker not in " ".join(inputs):
                await asyncio.sleep(0.5)
                sessions = (await api.get("/api/v1/sessions")).raise_for_status().json()["items"]
                inputs = []
                for row in sessions:
                    events = await api.get(f"/api/v1/sessions/{row['id']}/events", params={"eventid": COMMAND_INPUT})
                    inputs += [str(e["data"].get("input")) for e in events.raise_for_status().json()["items"]]
        assert {row["sensor"] for row in sessions} == {dep.sensor}
    dep.timings["command input in the API"] = time.monotonic() - started

    # The honeypot container holds no engine socket; only the proxy's container mounts it.
    honeypot, proxy = await container_id(dep, "honeypot"), await container_id(dep, "engine-proxy")
    hp_info, proxy_info = await inspect(honeypot), await inspect(proxy)
    hp_sources = {str(m["Source"]) for m in hp_info["Mounts"]}
    proxy_sources = {str(m["Source"]) for m in proxy_info["Mounts"]}
    assert not any(s.endswith("docker.sock") for s in hp_sources), hp_sources
    assert "/var/run/docker.sock" in proxy_sources
    rc, out = await sh(
        ["docker", "exec", honeypot, "sh", "-c", "ls /var/run/docker.sock /run/docker.sock"], dep.env, 30
    )
    assert rc != 0, out
    rc, out = await sh(["docker", "exec", honeypot, "id", "-u"], dep.env, 30)
    assert (rc, out.strip()) == (0, "10022"), out  # not root

    # From inside the honeypot container, the proxy refuses what sandtrap never asks of the engine.
    for request in ("GET /volumes", "POST /images/create?fromImage=debian&tag=latest", "GET /info"):
        rc, out = await sh(["docker", "exec", honeypot, "python3", "-c", PROBE, request], dep.env, 30)
        assert rc == 0 and out.split()[:2] == ["HTTP/1.1", "403"], (request, out)
    rc, out = await sh(["docker", "exec", honeypot, "python3", "-c", PROBE, "GET /version"], dep.env, 30)
    assert rc == 0 and out.split()[:2] == ["HTTP/1.1", "200"], out  # the same socket lets sandtrap's calls through
