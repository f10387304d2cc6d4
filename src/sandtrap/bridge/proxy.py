"""Relay bytes between an SSH channel and a sandbox process, with back-pressure both ways.

Attacker -> box: data from the channel is queued; past ``HIGH_WATER`` bytes the channel stops
reading (the SSH window closes), and reading resumes below ``LOW_WATER``.
Box -> attacker: the next chunk is read from the process only while the channel is writable, and
the engine's stream is itself a bounded queue, so a ``cat`` of a huge file never piles up here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import STDERR, ExitStatus, Process, TermSize

log = logging.getLogger(__name__)

HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024


class ChannelPort(Protocol):
    """The SSH side as the relay sees it."""

    def send(self, data: bytes, stderr: bool) -> None: ...

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class RelayObserver(Protocol):
    """Sees every byte that crosses (the recorder, the command reconstruction)."""

    def on_input(self, data: bytes) -> None: ...

    def on_output(self, data: bytes, stderr: bool) -> None: ...

    def on_resize(self, size: TermSize) -> None: ...


@dataclass
class Usage:
    """Per connection: what crossed and when, for limits and the closing record."""

    bytes_in: int = 0
    bytes_out: int = 0
    last_activity: float = field(default_factory=time.monotonic)

    def touch(self) -> None:
        self.last_activity = time.monotonic()


class Relay:
    def __init__(
        self, process: Process, port: ChannelPort, usage: Usage, observers: list[RelayObserver] | None = None
    ) -> None:
        self._process = process
        self._port = port
        self._usage = usage
        self._observers = observers or []
        self._queue: deque[bytes] = deque()
        self._queued = 0
        self._paused = False
        self._eof = False
        self._has_input = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()

    # -- called from the channel's callbacks (synchronous) ----------------------------------------
    def feed(self, data: bytes) -> None:
        self._usage.bytes_in += len(data)
        self._usage.touch()
        for obs in self._observers:
            obs.on_input(data)
        self._queue.append(data)
        self._queued += len(data)
        self._has_input.set()
        if self._queued > HIGH_WATER and not self._paused:
            self._paused = True
            self._port.pause_reading()

    def feed_eof(self) -> None:
        self._eof = True
        self._has_input.set()

    def set_writable(self, writable: bool) -> None:
        if writable:
            self._writable.set()
        else:
            self._writable.clear()

    async def resize(self, size: TermSize) -> None:
        for obs in self._observers:
            obs.on_resize(size)
        await self._process.resize(size)

    # -- the relay itself ------------------------------------------------------------------------
    async def run(self) -> ExitStatus:
        pump_in = asyncio.create_task(self._pump_in())
        try:
            await self._pump_out()
            return await self._process.wait()
        finally:
            pump_in.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pump_in

    async def _pump_out(self) -> None:
        while True:
            await self._writable.wait()
            chunk = await self._process.read()
            if chunk is None:
                return
            stderr = chunk.stream == STDERR
            self._usage.bytes_out += len(chunk.data)
            self._usage.touch()
            for obs in self._observers:
                obs.on_output(chunk.data, stderr)
            self._port.send(chunk.data, stderr)

    async def _pump_in(self) -> None:
        try:
            while True:
                await self._has_input.wait()
                while self._queue:
                    data = self._queue.popleft()
                    self._queued -= len(data)
                    await self._process.write(data)
                    if self._paused and self._queued < LOW_WATER:
                        self._paused = False
                        self._port.resume_reading()
                self._has_input.clear()
                if self._eof:
                    await self._process.close_stdin()
                    return
        except SandboxError as exc:
            log.debug("input relay ended: %s", exc)
