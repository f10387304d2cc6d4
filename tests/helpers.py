"""Helpers for integration tests (import as ``from helpers import run``)."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sandtrap.config import Settings
from sandtrap.sandbox.docker import engine, seccomp
from sandtrap.sandbox.docker.spec import LABEL_SENSOR, safe_name
from sandtrap.sandbox.host.cgroups import ParentCgroups
from sandtrap.sandbox.nspawn.sandbox import NspawnSandbox

# The checkout's data dir, where `make setup` puts the image cache (and earlier set-ups sandtrap's seccomp profile).
DATA_DIR = Path(__file__).resolve().parents[1] / Settings().storage.data_dir


def seccomp_profile(setting: str = seccomp.SANDTRAP) -> str | None:
    """The profile's text for a backend (``sandbox.docker.seccomp_profile`` resolved against the checkout's data dir)."""
    return seccomp.resolve(setting, DATA_DIR)


async def remove_sensor_containers(sensor: str) -> None:
    async with engine.engine() as client:
        rows = await client.containers.list(all=True, filters={"label": [f"{LABEL_SENSOR}={sensor}"]})
        await asyncio.gather(*(c.delete(force=True, v=True) for c in rows), return_exceptions=True)
    # ... and their parent cgroups (limits_in_parent), which the engine lets go of just after the removal.
    parents = ParentCgroups(prefix=f"sandtrap-{safe_name(sensor)}")
    for _ in range(30):
        await asyncio.to_thread(parents.sweep, frozenset(), True)
        if not any((h / parents.prefix).exists() for h in parents.root.iterdir()):
            break
        await asyncio.sleep(0.1)


async def run(sandbox: Any, cmd: str, user: str = "root", stdin: bytes | None = None) -> tuple[int, str, str]:
    """Run ``sh -c cmd`` in a sandbox; return (exit code, stdout, stderr)."""
    proc = await sandbox.exec(["sh", "-c", cmd], user=user)
    if stdin is not None:
        await proc.write(stdin)
    await proc.close_stdin()
    out, err = bytearray(), bytearray()
    while (chunk := await proc.read()) is not None:
        (out if chunk.stream == 1 else err).extend(chunk.data)
    status = await proc.wait()
    return status.code, out.decode(errors="replace"), err.decode(errors="replace")


async def counter_total(container_id: str | NspawnSandbox, controller: str, name: str, key: str) -> int:
    """A kernel event counter (``key`` in the flat-keyed file ``name``, e.g. ``oom_kill`` in
    ``memory.oom_control``, ``max`` in ``pids.events``) summed over a box's cgroups, read from the host:
    the kernel counts where the event happened, which may be a session scope below the box's root."""
    top = await _limit_dir(container_id, controller)

    def total() -> int:
        n = 0
        for path in [top / name, *top.rglob(f"*/{name}")]:
            try:
                fields = dict(line.split() for line in path.read_text().splitlines() if len(line.split()) == 2)
            except OSError:
                continue
            n += int(fields.get(key, 0))
        return n

    return await asyncio.to_thread(total)


async def _limit_dir(container_id: str | NspawnSandbox, controller: str) -> Path:
    if isinstance(container_id, NspawnSandbox):  # the box's per-box parent cgroup, where its limits are
        r = container_id.record
        return Path("/sys/fs/cgroup") / controller / r.cgroup_prefix / r.cgroup
    async with engine.engine() as client:
        info = await client.containers.container(container_id).show()
    pid = int(info["State"]["Pid"])
    rows = (await asyncio.to_thread(Path(f"/proc/{pid}/cgroup").read_text)).splitlines()
    path = next(p for _, ctrls, p in (r.split(":", 2) for r in rows) if controller in ctrls.split(","))
    own = Path("/sys/fs/cgroup") / controller / path.lstrip("/")
    return own.parent if info["HostConfig"].get("CgroupParent") else own


async def limit_files(container_id: str | NspawnSandbox, controller: str, *names: str) -> dict[str, str]:
    """Files of the host cgroup that holds a box's ``controller`` limit, read from the host: the box's parent
    cgroup when the limits sit there (``sandbox.docker.limits_in_parent``, nspawn's boxes), else the box's own
    cgroup. ``container_id``: a Docker container's id, or an nspawn box."""
    where = await _limit_dir(container_id, controller)
    return {name: (await asyncio.to_thread((where / name).read_text)).strip() for name in names}


async def box_of(hp: Any) -> Any:
    """The (only) active box of a honeypot with one session."""
    for _ in range(200):
        active = list(hp.services.pool._active.values())
        if active:
            return active[0][0]
        await asyncio.sleep(0.05)
    raise AssertionError("no active box")


# --- a client off loopback: a network namespace of the test's own ----------------------------------------

NS_HOST, NS_CLIENT = "198.51.100.1", "198.51.100.2"


def _ip(*args: str, netns: str | None = None) -> None:
    argv = ["ip", *(["-n", netns] if netns else []), *args]
    subprocess.run(argv, check=True, capture_output=True, timeout=30)


@pytest.fixture
def client_netns() -> Iterator[str]:
    """A network namespace at 198.51.100.2/30 joined to the host (198.51.100.1/30) by a veth pair; removed
    afterwards (with it the veth pair and its routes)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2")
    tag = secrets.token_hex(3)
    ns, host_if, ns_if = f"st-conn-{tag}", f"stc{tag}h", f"stc{tag}n"
    _ip("netns", "add", ns)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if, "netns", ns)
        _ip("addr", "add", f"{NS_HOST}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("addr", "add", f"{NS_CLIENT}/30", "dev", ns_if, netns=ns)
        _ip("link", "set", ns_if, "up", netns=ns)
        _ip("link", "set", "lo", "up", netns=ns)
        yield ns
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, timeout=30)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
