"""A raw TCP service: each connection proxied into ``target_port`` of the attacker's own box.

The box is the source IP's (the one its SSH or telnet logins get); the bytes go to the box's 127.0.0.1:<port>
from inside its network namespace (the box needs no network), so the image's nginx answers a fake HTTP. Both
ways are recorded with timing (``bridge/stream.py``); ``session.timeout_seconds`` and the limits section end a
connection through its :class:`~sandtrap.bridge.connection.Connection`; ``session.max_bytes`` is cut exactly here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from sandtrap.bridge.connection import Connection, Hub, ServiceBounds, printable
from sandtrap.bridge.stream import RawService, StreamRecorder, open_box_port, recorder_for
from sandtrap.config import split_listen
from sandtrap.errors import SandboxError
from sandtrap.events import STREAM_CLOSED, STREAM_INPUT, STREAM_OPEN
from sandtrap.logs import RateLimited, session_context

log = logging.getLogger(__name__)
failures = RateLimited(log)

READ_SIZE = 65536
FIRST_INPUT = 1024  # the first bytes of a connection, in its event (a request line, a banner grab)


class _Budget:
    """``max_bytes`` both ways together: how much of a chunk may still pass."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0

    def take(self, n: int) -> int:
        if self.limit is None:
            return n
        allowed = max(0, min(n, self.limit - self.used))
        self.used += allowed
        return allowed


class TCPStream:
    """One attacker connection to a raw TCP service."""

    def __init__(self, hub: Hub, service: RawService, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.hub = hub
        self.service = service
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("", 0)
        sock = writer.get_extra_info("sockname") or ("", 0)
        bounds = ServiceBounds(service.name, service.timeout_s, service.max_bytes, service.persona)
        self.link = Connection(
            hub, (str(peer[0]), int(peer[1])), (str(sock[0]), int(sock[1])), self._close, "tcp", bounds
        )
        self._budget = _Budget(service.max_bytes)
        self._first = True
        self._recorder: StreamRecorder | None = None
        self._closed_by_client = True
        self._box_writer: asyncio.StreamWriter | None = None

    def _close(self) -> None:
        """A limit or shutdown ends the connection: both ends go (the pumps see their ends close)."""
        self.writer.transport.abort()
        if self._box_writer is not None:
            self._box_writer.transport.abort()

    async def run(self) -> None:
        link = self.link
        link.owns_box_activity = False  # honeytoken reads and changed files are the box's logins', not a request's
        if not link.open():
            self.writer.transport.abort()
            link.lost()
            return
        session_context.set(f"{link.session} {link.src_ip}")
        box_writer: asyncio.StreamWriter | None = None
        error: str | None = None
        try:
            try:
                sock, box_name = await open_box_port(link, self.service)
            except (SandboxError, OSError, TimeoutError) as exc:
                # What a client sees when nothing listens: the connection goes away.
                link.close_reason = "box_port_unreachable"
                failures.log(logging.WARNING, "unreachable", "%s: the box's port %d: %s", self.service.name,
                             self.service.target_port, exc)  # fmt: skip
                return
            box_reader, box_writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
            self._box_writer = box_writer
            self._recorder = recorder_for(link, self.service)
            stream = self._recorder.path
            link.emitter.emit(
                STREAM_OPEN,
                target_port=self.service.target_port,
                transport="tcp",
                stream=str(stream.relative_to(self.hub.data_dir)) if stream else "",
                sandbox_name=box_name,
            )
            await self._relay(box_reader, box_writer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # this connection's failure, never the listener's
            error = str(exc)
            log.exception("tcp stream failed")
        finally:
            if box_writer is not None:
                box_writer.close()
            self.writer.close()
            self._finish()
            link.lost(error)

    async def _relay(self, box_reader: asyncio.StreamReader, box_writer: asyncio.StreamWriter) -> None:
        up = asyncio.create_task(self._pump(self.reader, box_writer, True))
        down = asyncio.create_task(self._pump(box_reader, self.writer, False))
        try:
            # Either side closing its sending half is passed on; the connection ends when both are done, or
            # on a limit (the pumps stop at max_bytes; the watchdog closes the client for the others).
            await asyncio.gather(up, down)
        finally:
            for t in (up, down):
                t.cancel()
            await asyncio.gather(up, down, return_exceptions=True)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter, from_client: bool) -> None:
        usage = self.link.usage
        try:
            while data := await src.read(READ_SIZE):
                allowed = self._budget.take(len(data))
                data = data[:allowed]
                if from_client:
                    usage.bytes_in += len(data)
                    if self._first and data:
                        self._first = False
                        self.link.emitter.emit(STREAM_INPUT, input=printable(data, FIRST_INPUT), size=len(data))
                else:
                    usage.bytes_out += len(data)
                usage.touch()
                if self._recorder is not None:
                    self._recorder.record(from_client, data)
                if data:
                    dst.write(data)
                    await dst.drain()
                if self._budget.limit is not None and self._budget.used >= self._budget.limit:
                    self.link.end("max_bytes", self._budget.used)
                    return
            if not from_client:
                self._closed_by_client = False
            if dst.can_write_eof():
                with contextlib.suppress(OSError, RuntimeError):
                    dst.write_eof()
        except (ConnectionError, OSError):
            return

    def _finish(self) -> None:
        recorder, self._recorder = self._recorder, None
        if recorder is None:
            return
        sha = recorder.close(self._closed_by_client)
        usage = self.link.usage
        self.link.emitter.emit(
            STREAM_CLOSED,
            target_port=self.service.target_port,
            bytes_in=usage.bytes_in,
            bytes_out=usage.bytes_out,
            stream=str(recorder.path.relative_to(self.hub.data_dir)) if recorder.path else "",
            pcap=str(recorder.pcap_path.relative_to(self.hub.data_dir)) if recorder.pcap_path else "",
            shasum=sha,
            reason=self.link.close_reason or "closed",
        )


class TCPFrontEnd:
    """Owns one raw TCP listener."""

    def __init__(self, hub: Hub, service: RawService, listen: str) -> None:
        self._hub = hub
        self._service = service
        self._listen = listen
        self._server: asyncio.Server | None = None
        self._streams: set[asyncio.Task[None]] = set()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        host, port = split_listen(self._listen)
        self._server = await asyncio.start_server(
            self._accept, host if host not in ("0.0.0.0", "::", "") else None, port, reuse_address=True, limit=READ_SIZE
        )
        log.info("tcp service %s listening on %s (port %d) -> box port %d", self._service.name, self._listen,
                 self.port, self._service.target_port)  # fmt: skip

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)
        await TCPStream(self._hub, self._service, reader, writer).run()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        self._hub.end_all("shutdown")
        if self._streams:
            await asyncio.wait(set(self._streams), timeout=10)
