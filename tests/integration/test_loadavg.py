"""Each box's /proc/loadavg from `sandtrap loadavgfs`, on the real engine: the box's own tasks and pid numbering
from its first read, a load that follows what runs in it, and boxes that still start when the daemon is dead."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from asyncio.subprocess import Process
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.sandbox import DockerSandbox
from sandtrap.sandbox.host.loadavgfs import FSTYPE, mounted_here, unmount

from helpers import run

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not os.path.exists("/dev/fuse"), reason="needs root and /dev/fuse (a FUSE mount)"
)

LOADAVG = re.compile(r"(\d+\.\d\d) (\d+\.\d\d) (\d+\.\d\d) (\d+)/(\d+) (\d+)$")
# The battery's probe: /proc/loadavg and the reader's pid, then the threads the box can see; and the kernel's
# own newest pid of the box's namespace just after (ns_last_pid is the reader's namespace's, read-only here).
PROBE = "sh -c 'cat /proc/loadavg; echo $$'; ls -d /proc/[0-9]*/task/[0-9]* | wc -l; cat /proc/sys/kernel/ns_last_pid"


class Probe(NamedTuple):
    loadavg: re.Match[str]
    reader: int  # the shell whose `cat` read /proc/loadavg
    threads: int
    kernel_last_pid: int  # read after the probe's read

    def last_pid_is_the_boxs(self) -> bool:
        """The `cat` (the reader's child) or a newer pid, and never past what the kernel allocated since."""
        return self.reader < int(self.loadavg[6]) <= self.kernel_last_pid


def answers(mountpoint: Path) -> bool:
    """A read answered (a stat may come from the kernel's cache of a dead mount)."""
    try:
        return LOADAVG.match((mountpoint / "proc" / "loadavg").read_text().strip()) is not None
    except OSError:
        return False


async def start_daemon(mountpoint: Path, log: Path) -> Process:
    with log.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sandtrap.cli",
            "loadavgfs",
            str(mountpoint),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    for _ in range(100):
        if proc.returncode is not None:
            raise AssertionError(f"sandtrap loadavgfs exited {proc.returncode}: {log.read_text()}")
        if answers(mountpoint):
            return proc
        await asyncio.sleep(0.1)
    proc.kill()
    await proc.wait()
    raise AssertionError(f"sandtrap loadavgfs did not mount: {log.read_text()}")


@pytest.fixture
async def daemon(tmp_path: Path) -> AsyncIterator[tuple[Path, Process]]:
    mountpoint = tmp_path / "loadavg"
    proc = await start_daemon(mountpoint, tmp_path / "loadavgfs.log")
    try:
        yield mountpoint, proc
    finally:
        if proc.returncode is None:
            proc.terminate()
            async with asyncio.timeout(10):
                await proc.wait()
        if mounted_here(str(mountpoint)):
            unmount(str(mountpoint))


@pytest.fixture
async def served(
    daemon: tuple[Path, Process],
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
) -> tuple[Path, DockerBackend]:
    """The daemon's mount and a backend whose boxes get its /proc/loadavg."""
    return daemon[0], backend_factory(sandbox_settings(loadavg_dir=str(daemon[0])))


async def box(backend: DockerBackend) -> DockerSandbox:
    return await backend.create()


async def host_binds(sandbox: DockerSandbox) -> list[str]:
    async with engine.engine() as client:
        info = await client.containers.container(sandbox.id).show()
    return list(info["HostConfig"]["Binds"] or [])


async def probe(sandbox: DockerSandbox) -> Probe:
    code, out, err = await run(sandbox, PROBE)
    lines = out.split()
    assert code == 0 and len(lines) == 8, (out, err)
    m = LOADAVG.match(" ".join(lines[:5]))
    assert m, out
    return Probe(m, int(lines[5]), int(lines[6]), int(lines[7]))


def mount_options(mountpoint: Path) -> tuple[set[str], str, set[str]]:
    """The mount's own options, its file system type and its super block's options (/proc/self/mountinfo)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        pre, _, post = line.partition(" - ")
        if pre.split()[4] == str(mountpoint):
            fstype, _source, options = post.split()[:3]
            return set(pre.split()[5].split(",")), fstype, set(options.split(","))
    raise AssertionError(f"{mountpoint} is not mounted")


async def test_a_fresh_box_reads_its_own_tasks_and_pids(served: tuple[Path, DockerBackend]) -> None:
    mountpoint, backend = served
    own, fstype, sb = mount_options(mountpoint)
    assert fstype == FSTYPE and {"ro", "nosuid", "nodev", "noexec"} <= own, (own, fstype)
    assert {"ro", "allow_other", "default_permissions", "user_id=0"} <= sb, sb
    sandbox = await box(backend)
    binds = await host_binds(sandbox)
    assert f"{mountpoint}/proc/loadavg:/proc/loadavg:ro" in binds
    assert not any(b.startswith("/var/lib/lxcfs/proc/loadavg") for b in binds)

    # Read right after start: the box's own thread count and its own pid numbering, never lxcfs's "0/1".
    p = await probe(sandbox)
    running, total = int(p.loadavg[4]), int(p.loadavg[5])
    assert 1 <= running <= total
    assert abs(total - p.threads) <= 3, p  # the probe's own short-lived processes come and go
    assert p.last_pid_is_the_boxs(), p
    assert p.reader < 1000  # a box's numbering, not the host's

    # Writing is refused; the file is the same for every user of the box.
    code, _, err = await run(sandbox, "echo 1 > /proc/loadavg")
    assert code != 0 and "Read-only file system" in err
    code, out, _ = await run(sandbox, "cat /proc/loadavg", user="nobody")
    assert code == 0 and LOADAVG.match(out.strip()), out


async def test_boxes_count_only_their_own_tasks_and_load(served: tuple[Path, DockerBackend]) -> None:
    _, backend = served
    busy, quiet = await box(backend), await box(backend)
    # 20 sleeping processes and one busy loop in one box only.
    code, _, err = await run(busy, "for i in $(seq 20); do sleep 300 & done; (while :; do :; done) & exit 0")
    assert code == 0, err
    p_busy, p_quiet = await probe(busy), await probe(quiet)
    assert abs(int(p_busy.loadavg[5]) - p_busy.threads) <= 3 and p_busy.threads >= 22, p_busy
    assert abs(int(p_quiet.loadavg[5]) - p_quiet.threads) <= 3 and p_quiet.threads < 20, p_quiet
    assert p_busy.last_pid_is_the_boxs() and p_quiet.last_pid_is_the_boxs(), (p_busy, p_quiet)
    # The daemon samples every 5 s: after a sample, the busy loop shows in one box's load and not the other's.
    # The busy box is read first above, so both are tracked; wait on the box, not on our clock.
    code, _, _ = await run(busy, "sleep 6")
    m_busy, m_quiet = (await probe(busy)).loadavg, (await probe(quiet)).loadavg
    assert float(m_busy[1]) >= 0.05, m_busy[0]  # one runnable task for one 5-s period: 0.08
    assert float(m_quiet[1]) <= float(m_busy[1]) / 2, (m_quiet[0], m_busy[0])


async def test_a_dead_daemon_leaves_boxes_starting_with_lxcfs_s_loadavg(
    daemon: tuple[Path, Process],
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    caplog: pytest.LogCaptureFixture,
) -> None:
    mountpoint, proc = daemon
    proc.kill()  # SIGKILL: no unmount, the mount answers ENOTCONN
    async with asyncio.timeout(10):
        await proc.wait()
    assert mounted_here(str(mountpoint))
    settings = sandbox_settings(loadavg_dir=str(mountpoint))
    backend = backend_factory(settings)
    sandbox = await box(backend)
    binds = await host_binds(sandbox)
    assert not any(b.startswith(str(mountpoint)) for b in binds)
    assert "not usable" in caplog.text
    code, out, _ = await run(sandbox, "cat /proc/loadavg")
    assert code == 0 and LOADAVG.match(out.strip()), out
    # A new daemon detaches the dead mount and serves again.
    proc2 = await start_daemon(mountpoint, mountpoint.parent / "loadavgfs2.log")
    try:
        assert f"{FSTYPE} mount" in (mountpoint.parent / "loadavgfs2.log").read_text()
        sandbox = await box(backend)
        p = await probe(sandbox)
        assert p.last_pid_is_the_boxs(), p
    finally:
        proc2.terminate()
        async with asyncio.timeout(10):
            await proc2.wait()
