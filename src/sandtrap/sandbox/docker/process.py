"""A ``docker exec`` as a :class:`~sandtrap.sandbox.base.Process`: aiodocker's hijacked stream, whose bounded
queue pauses the socket, gives the bridge back-pressure."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable

import aiodocker
from aiodocker.execs import Exec
from aiodocker.stream import Stream

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Chunk, ExitStatus, TermSize, exit_status
from sandtrap.sandbox.docker import engine, mtls

log = logging.getLogger(__name__)

# Run by /bin/sh before the command itself (exec: the same process): its pid in the box, one line on stderr.
PID_ANNOUNCE = 'echo "$$" >&2 && exec "$@"'
MAX_PID_LINE = 16


class DockerProcess:
    """A ``docker exec`` with its hijacked stream; output is bounded by aiodocker's flow-control queue."""

    def __init__(
        self,
        execution: Exec,
        stream: Stream,
        tty: bool,
        local: bool = False,
        kill_in_box: Callable[[int], Awaitable[None]] | None = None,
    ) -> None:
        """``local``: the engine runs on this host, so the exec's pid (the engine reports the host's) can be
        signalled from here. ``kill_in_box``: else the process was started by :data:`PID_ANNOUNCE`, and is killed
        by its pid in the box through this."""
        self._local = local
        self._kill_in_box = kill_in_box
        self._pid_line: bytearray | None = bytearray() if kill_in_box is not None else None
        self.box_pid = 0  # its pid in the box, once announced
        self._exec = execution
        self._stream = stream
        self._tty = tty
        self._stdin_closed = False
        self._status: ExitStatus | None = None

    async def read(self) -> Chunk | None:
        while True:
            try:
                msg = await self._stream.read_out()
            except (aiodocker.DockerError, OSError) as exc:
                log.debug("exec stream read ended: %r", exc)
                return None
            if msg is None:
                return None
            if msg.stream != 2 or self._pid_line is None:
                return Chunk(msg.stream, msg.data)
            data = self._take_pid(msg.data)
            if data:
                return Chunk(2, data)

    def _take_pid(self, data: bytes) -> bytes:
        """The announced pid line taken off the start of stderr; what follows it (or all, if it is not one)."""
        assert self._pid_line is not None
        head, newline, rest = data.partition(b"\n")
        self._pid_line += head
        if not newline and len(self._pid_line) <= MAX_PID_LINE:
            return b""
        line, self._pid_line = bytes(self._pid_line), None
        if newline and line.isdigit():
            self.box_pid = int(line)
            return rest
        return line + newline + rest

    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            return
        try:
            await self._stream.write_in(data)
        except (RuntimeError, OSError, AssertionError) as exc:
            raise SandboxError(f"write to process stdin failed: {exc}") from exc

    async def close_stdin(self) -> None:
        """Half-close the hijacked connection: the engine turns it into EOF on the process's stdin."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        resp = self._stream._resp  # aiodocker keeps no public half-close; this is its own transport
        conn = resp.connection if resp is not None else None
        transport = conn.transport if conn is not None else None
        if transport is None:
            return
        if transport.can_write_eof():
            transport.write_eof()
        elif not await mtls.write_eof(transport):  # a TLS engine (sandbox.docker.tls_*): close_notify
            log.warning("a process's stdin in the box stays open: the engine's TLS connection cannot be half-closed")

    async def resize(self, size: TermSize) -> None:
        if not self._tty:
            return
        try:
            await engine.call("exec resize", self._exec.resize(h=size.rows, w=size.cols), 10)
        except SandboxError as exc:
            log.debug("resize ignored: %s", exc)

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        deadline = time.monotonic() + 10.0
        delay = 0.005
        try:
            while True:
                info = await engine.call("exec inspect", self._exec.inspect(), 10)
                if not info.get("Running") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        finally:  # the stream is closed even when the engine is gone (an unclosed one warns when collected)
            await self._close()
        code = info.get("ExitCode")
        self._status = exit_status(code if isinstance(code, int) else 255)
        return self._status

    async def kill(self) -> None:
        """End the process: closing the stream hangs a TTY up, but a process without one would run on, so one
        still running is killed (a local engine: its host pid, as the engine reports it)."""
        if self._status is None and not self._local and self._kill_in_box is not None and self.box_pid > 0:
            try:
                info = await engine.call("exec inspect", self._exec.inspect(), 5)
                if info.get("Running"):  # else its pid may be another process's by now
                    await self._kill_in_box(self.box_pid)
            except SandboxError as exc:
                log.debug("killing pid %d in the box failed: %s", self.box_pid, exc)
        if self._status is None and self._local:
            try:
                info = await engine.call("exec inspect", self._exec.inspect(), 5)
            except SandboxError:
                info = {}
            pid = int(info.get("Pid") or 0)
            if info.get("Running") and pid > 0:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        await self._close()

    def __del__(self) -> None:
        # A process dropped without wait() or kill() (its task cancelled at shutdown, an error half-way):
        # release its engine connection now rather than leave aiodocker to warn when it is collected.
        stream = getattr(self, "_stream", None)
        resp = getattr(stream, "_resp", None)
        if stream is not None and resp is not None and not stream._closed:
            stream._closed = True
            with contextlib.suppress(Exception):
                resp.close()

    async def _close(self) -> None:
        try:
            await self._stream.close()
        except Exception as exc:  # closing a broken stream must never break a session
            log.debug("exec stream close: %r", exc)
