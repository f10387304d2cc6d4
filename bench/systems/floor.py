"""The floor under sandtrap: the same hardened box, reached directly with ``docker exec -it``.

The box is made by sandtrap's own :class:`DockerBackend` (same image, same hardening), labelled with
the run's sensor so the clean-up finds it. ``docker exec -it`` runs in a pseudo-terminal of ours,
so it measures the engine's TTY path with no SSH in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pty
import struct
import termios
import time
from dataclasses import dataclass
from pathlib import Path

from bench.client import Screen
from sandtrap.config import Settings
from sandtrap.sandbox.docker import seccomp
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.sandbox import DockerSandbox

ROOT = Path(__file__).resolve().parents[2]


def default_backend(sensor: str) -> DockerBackend:
    """A backend with sandtrap's defaults, its seccomp profile from the checkout's data dir (``make setup``)."""
    s = Settings()
    docker = s.sandbox.docker
    return DockerBackend(docker, s.sandbox, sensor, seccomp.resolve(docker.seccomp_profile, ROOT / s.storage.data_dir))


@dataclass
class Floor:
    backend: DockerBackend
    sandbox: DockerSandbox


async def create_floor(sensor: str) -> Floor:
    backend = default_backend(sensor)
    sandbox = await backend.create()
    return Floor(backend, sandbox)


class PtyTerminal:
    """``docker exec -it`` in a pseudo-terminal; what it prints lands in a :class:`Screen`."""

    def __init__(self, screen: Screen, master: int, process: asyncio.subprocess.Process) -> None:
        self.screen = screen
        self._master = master
        self.process = process

    @classmethod
    async def open(cls, container_id: str, cols: int = 80, rows: int = 24) -> PtyTerminal:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
        process = await asyncio.create_subprocess_exec(
            "docker", "exec", "-it", "-e", "TERM=xterm", container_id, "/bin/bash", "-l",
            stdin=slave, stdout=slave, stderr=slave, start_new_session=True,
        )  # fmt: skip
        os.close(slave)
        os.set_blocking(master, False)
        screen = Screen()
        term = cls(screen, master, process)
        asyncio.get_running_loop().add_reader(master, term._readable)
        return term

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            asyncio.get_running_loop().remove_reader(self._master)
            self.screen.feed_eof()
            return
        self.screen.feed(data)

    def send(self, data: bytes) -> None:
        os.write(self._master, data)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._master)
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                await self.process.wait()
        with contextlib.suppress(OSError):
            os.close(self._master)


async def cold_creations(sensor: str, count: int) -> list[dict[str, float]]:
    """Create+start a hardened box and run a first command in it, ``count`` times in a row (then remove it)."""
    backend = default_backend(sensor)
    out = []
    try:
        for _ in range(count):
            t0 = time.perf_counter()
            box = await backend.create()
            t1 = time.perf_counter()
            proc = await box.exec(["true"])
            await proc.close_stdin()
            while await proc.read() is not None:
                pass
            await proc.wait()
            t2 = time.perf_counter()
            out.append({"create_start_ms": (t1 - t0) * 1000, "ready_ms": (t2 - t0) * 1000})
            await box.remove()
    finally:
        await backend.close()
    return out
