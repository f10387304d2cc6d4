"""What every system under test has: an address, credentials, a process tree to measure, a way to stop.

Everything listens on 127.0.0.1 only; :func:`check_loopback_only` refuses to go on if a server we
started listens anywhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

HOST = "127.0.0.1"


class BenchError(RuntimeError):
    """A system could not be set up or measured."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


async def wait_port(port: int, process: asyncio.subprocess.Process, timeout_s: float, log: Path) -> None:
    """Wait until something accepts on 127.0.0.1:port, or fail if the process died or time ran out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.returncode is not None:
            raise BenchError(f"exited with {process.returncode} before listening; see {log}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection(HOST, port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"not listening on {HOST}:{port} after {timeout_s:.0f}s; see {log}")


def tree(pid: int) -> list[psutil.Process]:
    """The process and its live descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """User+system CPU of each process plus what its reaped children used (no double counting)."""
    total = 0.0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
    return total


def rss_bytes(procs: list[psutil.Process]) -> int:
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def pss_bytes(procs: list[psutil.Process]) -> int:
    """Proportional set size: shared pages split between the processes sharing them."""
    total = 0
    for p in procs:
        with contextlib.suppress(psutil.Error):
            total += p.memory_full_info().pss
    return total


def host_used_bytes() -> int:
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


def engine_procs() -> list[psutil.Process]:
    """The Docker engine's processes (dockerd, containerd, one shim per container)."""
    out = []
    for p in psutil.process_iter(["name"]):
        name = p.info.get("name") or ""
        if name in ("dockerd", "containerd") or name.startswith("containerd-shim"):
            out.append(p)
    return out


def check_loopback_only(name: str, pid: int) -> list[str]:
    """Every listening socket of the process tree must be on a loopback address."""
    listening = []
    for p in tree(pid):
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            if c.status != psutil.CONN_LISTEN:
                continue
            addr = f"{c.laddr.ip}:{c.laddr.port}"
            if not ipaddress.ip_address(c.laddr.ip).is_loopback:
                raise BenchError(f"{name} listens on {addr}, not loopback: refusing to benchmark")
            listening.append(addr)
    return sorted(set(listening))


async def stop_group(process: asyncio.subprocess.Process, grace_s: float = 30.0) -> None:
    """SIGTERM the process group we started, SIGKILL it if it lingers."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 10.0)):
        if process.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
        try:
            async with asyncio.timeout(wait_s):
                await process.wait()
            return
        except TimeoutError:
            continue


@dataclass
class Server:
    """A running system under test."""

    name: str  # sandtrap | openssh | cowrie
    label: str  # shown in tables
    version: str
    port: int
    username: str
    password: str
    process: asyncio.subprocess.Process
    log: Path
    # Which processes of the tree are "the server" for memory (OpenSSH: sshd, not the users' shells).
    is_server_process: Callable[[psutil.Process], bool] = lambda p: True
    notes: list[str] = field(default_factory=list)
    listening: list[str] = field(default_factory=list)
    prompt_user: str = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        return cpu_seconds(tree(self.pid))

    def server_procs(self) -> list[psutil.Process]:
        out = []
        for p in tree(self.pid):
            with contextlib.suppress(psutil.Error):
                if self.is_server_process(p):
                    out.append(p)
        return out

    def rss_bytes(self) -> int:
        return rss_bytes(self.server_procs())

    def pss_bytes(self) -> int:
        return pss_bytes(self.server_procs())

    async def settle(self, timeout_s: float = 30.0, active: int = 0) -> bool:
        """Wait until what ended sessions left behind is done, ``active`` sessions staying open."""
        return True

    async def session_memory_bytes(self) -> int | None:
        """Memory of the sessions' own processes: what is in the tree and not the server (OpenSSH: the
        users' shells; Cowrie: none, its shell is emulated)."""
        procs = []
        for p in tree(self.pid):
            with contextlib.suppress(psutil.Error):
                if not self.is_server_process(p):
                    procs.append(p)
        return rss_bytes(procs)

    async def stop(self) -> None:
        await stop_group(self.process)
