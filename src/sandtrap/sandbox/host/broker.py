"""Sessions started by the box's own listener (``sandbox.session_transport: init``) instead of ``docker exec``.

The box's PID 1 forks a listener titled as sshd's (``listener.c``, linked into init) that serves an
abstract unix socket in the box's network namespace. The honeypot connects to it from a short-lived
thread of its own that enters that namespace (:mod:`sandtrap.sandbox.host.netns`), asks for a process
(argv, env, user, workdir, pty size) and receives its pty master and a pipe of the pty's output, or its
three pipes (``SCM_RIGHTS``);
the exit status comes back on the socket. The bytes then flow between the honeypot and the box's pty
directly, never through the engine. With a :class:`~sandtrap.sandbox.host.relay.RelayPlan`, the login's own TCP
connection to the box's :22 is made between the request and the start (see :mod:`sandtrap.sandbox.host.relay`);
its client end is closed with the process.

The messages, their constants and their encoding are :mod:`sandtrap.sandbox.host.boxwire`'s (described in
``box/PROTOCOL.md``); this module holds the connection and the process. Everything the box sends is hostile:
one bounded packet at a time, exact sizes, exactly the fds the request implies and of the expected type
(others closed), and time limits on every wait but the process's own life. Any failure here is a
:class:`BrokerError`, on which the backend falls back to ``docker exec``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat
import struct
import termios
import time
from collections.abc import Callable, Mapping, Sequence

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import STDERR, STDOUT, Chunk, ExitStatus, TermSize
from sandtrap.sandbox.host import relay as relays
from sandtrap.sandbox.host.boxwire import (
    MAX_FDS,
    MAX_REPLY,
    MAX_SIGNAL,
    REPLY_NO_RELAY,
    SOCKET_NAME,
    Connect,
    Exited,
    Reply,
    Started,
    encode_request,
    encode_signal,
    parse_reply,
)
from sandtrap.sandbox.host.boxwire import BrokerError as BrokerError  # what this module's callers catch
from sandtrap.sandbox.host.netns import in_box_netns

log = logging.getLogger(__name__)

READ_SIZE = 65536
CONNECT_TIMEOUT_S = 3.0
LISTEN_WAIT_S = 1.5  # a fresh box's listener not bound yet: refused connects retried this long
START_TIMEOUT_S = 5.0  # the request sent to the process started: covers the box's RELAY_WAIT_MS
DRAIN_AFTER_EXIT_S = 0.2  # output still buffered when the exit status arrives (a background job may hold the pty)
KILLED = ExitStatus(137, "KILL")
MAX_GARBAGE = 64  # unexpected packets on a process's socket before it is given up


def is_pty_master(st: os.stat_result) -> bool:
    """A descriptor of /dev/ptmx (character device 5:2): what posix_openpt gives, nothing else."""
    return stat.S_ISCHR(st.st_mode) and os.major(st.st_rdev) == 5 and os.minor(st.st_rdev) == 2


def check_fds(fds: Sequence[int], tty: bool) -> list[int]:
    """The fds a start reply must carry: a pty master and the pipe of its output, or three pipes. Returns them
    non-blocking; on any mismatch, closes them all and raises."""
    try:
        want = 2 if tty else 3
        if len(fds) != want:
            raise BrokerError(f"{len(fds)} fds where {want} were due")
        for i, fd in enumerate(fds):
            st = os.fstat(fd)
            if not (is_pty_master(st) if tty and i == 0 else stat.S_ISFIFO(st.st_mode)):
                raise BrokerError("an fd of the wrong type")
            os.set_blocking(fd, False)
    except BaseException:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        raise
    return list(fds)


# --- connecting to the box's listener ----------------------------------------------------------------


def _connect_listener(name: bytes) -> socket.socket:
    # A box created a moment ago (the pool ran dry) may not listen yet: its init starts the listener
    # after its boot work. Refused connects are retried for LISTEN_WAIT_S, on this thread only.
    deadline = time.monotonic() + LISTEN_WAIT_S
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(CONNECT_TIMEOUT_S)
            sock.connect(name)
            sock.setblocking(False)
            return sock
        except ConnectionRefusedError:
            sock.close()
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.02)
        except BaseException:
            sock.close()
            raise


async def connect(pid: int, is_same_box: Callable[[], bool], name: bytes | None = None) -> socket.socket:
    """A socket connected to the box's listener: sshd's (SOCKET_NAME), or ``name`` (INETD_SOCKET_NAME: inetd's)."""
    address = name or SOCKET_NAME
    return await in_box_netns(
        pid,
        is_same_box,
        lambda: _connect_listener(address),
        "the box's listener",
        CONNECT_TIMEOUT_S + LISTEN_WAIT_S + 1,
    )


def _wake(ready: asyncio.Future[None]) -> None:
    if not ready.done():
        ready.set_result(None)


async def _recv(sock: socket.socket, maxfds: int) -> tuple[bytes, list[int]]:
    """One packet and the fds it carries: more than ``maxfds`` (the kernel closes those that do not fit and
    says so with MSG_CTRUNC) or a packet larger than a reply can be is refused."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data, fds, flags, _ = socket.recv_fds(sock, MAX_REPLY, maxfds, socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(sock.fileno(), _wake, ready)
            try:
                await ready
            finally:
                loop.remove_reader(sock.fileno())
            continue
        if flags & (socket.MSG_CTRUNC | socket.MSG_TRUNC):
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise BrokerError("a reply too large, or with too many fds")
        return data, list(fds)


async def start(
    pid: int,
    is_same_box: Callable[[], bool],
    argv: Sequence[str | bytes],
    env: Mapping[str, str],
    user: str,
    workdir: str,
    tty: TermSize | None,
    plan: relays.RelayPlan | None = None,
    listener: bytes | None = None,
) -> BrokerProcess:
    """A process started by the box's listener (raises :class:`BrokerError` if it cannot be); with ``plan``, the
    box also holds the login's TCP connection to its :22 (inetd's ``listener``: :23) while the process lives (when
    it can be made)."""
    request = encode_request(argv, env, user, workdir, tty, plan.peer if plan is not None else None)
    sock = await connect(pid, is_same_box, listener)
    held: socket.socket | None = None
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            await asyncio.get_running_loop().sock_sendall(sock, request)
            reply, fds = await _recv_reply(sock)
            if isinstance(reply, Connect) and plan is not None:
                for fd in fds:  # none are due with it
                    os.close(fd)
                if reply.ready:
                    held = await _relay(pid, is_same_box, plan)
                    if held is None:
                        await asyncio.get_running_loop().sock_sendall(
                            sock, REPLY_NO_RELAY
                        )  # the worker waits no longer
                reply, fds = await _recv_reply(sock)
        if not isinstance(reply, Started):
            for fd in fds:
                os.close(fd)
            raise BrokerError(f"the listener did not start it: {reply}")
        fds = check_fds(fds, tty is not None)
    except TimeoutError as exc:
        sock.close()
        relays.close_quietly(held)
        raise BrokerError("the box's listener did not answer in time") from exc
    except BaseException:
        sock.close()
        relays.close_quietly(held)
        raise
    return BrokerProcess(sock, fds, tty is not None, held)


async def _recv_reply(sock: socket.socket) -> tuple[Reply, list[int]]:
    """One reply of the listener and the fds that came with it (closed if the reply does not parse)."""
    data, fds = await _recv(sock, MAX_FDS)  # at most MAX_FDS taken: more and MSG_CTRUNC refuses the reply
    try:
        return parse_reply(data), fds
    except BrokerError:
        for fd in fds:
            os.close(fd)
        raise


async def _relay(pid: int, is_same_box: Callable[[], bool], plan: relays.RelayPlan) -> socket.socket | None:
    """The client end of the login's connection to the box's :22, or None (the session goes on without it)."""
    try:
        if plan.in_box or plan.netns:  # in the box, or in the capture gateway's namespace (its only peer)
            return await in_box_netns(
                pid,
                is_same_box,
                lambda: relays.connect_in_box(plan),
                "the box's :22",
                relays.CONNECT_TIMEOUT_S + 1,
                plan.netns,
            )
        return await relays.connect_transparent(plan)
    except (OSError, BrokerError, TimeoutError) as exc:
        # Logged once per kind of failure (a box whose :22 or whose client address is taken is the attacker's doing).
        kind = errno.errorcode.get(exc.errno or 0, "") if isinstance(exc, OSError) else ""
        relays.note(f"connecting to the box's :22 from the client's address failed ({kind or type(exc).__name__})")
        log.debug("relay %s -> %s:22: %r", plan.peer, plan.server_ip, exc)
        return None


class BrokerProcess:
    """A process in the box whose pty master (or pipes) this honeypot holds; the listener's socket brings its
    exit status and takes its signals."""

    def __init__(self, sock: socket.socket, fds: list[int], tty: bool, held: socket.socket | None = None) -> None:
        self._sock = sock
        self._held = held  # the client end of the login's TCP connection in the box (see relay.py), if any
        self._tty = tty
        self._stdin: int | None = fds[0]
        # What is read: the pipe the listener's worker copies the pty into (both streams), or stdout and stderr.
        self._outputs: dict[int, int] = {fds[1]: STDOUT} if tty else {fds[1]: STDOUT, fds[2]: STDERR}
        self._owned = list(fds)
        self._status: ExitStatus | None = None
        self._exited = asyncio.Event()
        self._waiter: asyncio.Future[None] | None = None  # a read waiting for output (woken by the exit too)
        self._closed = False
        self._garbage = 0  # packets that were no exit status: past MAX_GARBAGE the socket is given up
        self._watch_socket()

    # -- the control socket

    def _watch_socket(self) -> None:
        asyncio.get_running_loop().add_reader(self._sock.fileno(), self._on_socket)

    def _on_socket(self) -> None:
        try:
            data, fds, _flags, _ = socket.recv_fds(self._sock, MAX_REPLY, 0)
        except BlockingIOError:
            return
        except OSError:
            data, fds = b"", []
        for fd in fds:  # none are due now
            with contextlib.suppress(OSError):
                os.close(fd)
        reply: Reply | None = None
        if data:
            try:
                reply = parse_reply(data)
            except BrokerError as exc:
                log.debug("listener sent garbage: %s", exc)
        if isinstance(reply, Exited):
            self._set_status(reply.status)
        elif not data:
            # The listener's worker is gone without a status: killed, with the box or by root in it. As the
            # engine reports an exec of a killed box: 137, SIGKILL.
            self._set_status(KILLED)
        else:
            self._garbage += 1
            if self._garbage > MAX_GARBAGE:  # a flood from the box: stop listening, the process counts as ended
                self._set_status(ExitStatus(255))

    def _set_status(self, status: ExitStatus) -> None:
        if self._status is None:
            self._status = status
        self._exited.set()
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        with contextlib.suppress(Exception):
            asyncio.get_running_loop().remove_reader(self._sock.fileno())

    # -- Process

    async def read(self) -> Chunk | None:
        loop = asyncio.get_running_loop()
        while self._outputs:
            for fd, stream in list(self._outputs.items()):
                try:
                    data = os.read(fd, READ_SIZE)
                except BlockingIOError:
                    continue
                except OSError as exc:  # EIO: the pty's last slave closed
                    if exc.errno not in (errno.EIO, errno.EBADF):
                        log.debug("read from the box: %r", exc)
                    data = b""
                if data:
                    return Chunk(stream, self._more(fd, data))
                self._drop_output(fd)
            if not self._outputs:
                break
            ready: asyncio.Future[None] = loop.create_future()
            self._waiter = ready

            exited = self._exited.is_set()
            registered = list(self._outputs)
            for fd in registered:
                loop.add_reader(fd, _wake, ready)
            timed_out = False
            try:
                if exited:
                    try:
                        async with asyncio.timeout(DRAIN_AFTER_EXIT_S):
                            await ready
                    except TimeoutError:
                        timed_out = True
                else:
                    await ready
            finally:
                self._waiter = None
                if not self._closed:  # else _close removed them (their numbers may be reused by now)
                    for fd in registered:
                        loop.remove_reader(fd)
            if timed_out:
                for fd in list(self._outputs):
                    self._drop_output(fd)
                return None
        return None

    @staticmethod
    def _more(fd: int, data: bytes) -> bytes:
        """What else is buffered already, up to READ_SIZE in all: a pty hands out a few KiB a read, and each
        chunk costs an SSH packet and a pass of the event loop."""
        parts = [data]
        size = len(data)
        while size < READ_SIZE:
            try:
                more = os.read(fd, READ_SIZE - size)
            except OSError:  # EAGAIN: nothing more now; EIO/EOF: the next read() says so
                break
            if not more:
                break
            parts.append(more)
            size += len(more)
        return data if len(parts) == 1 else b"".join(parts)

    def _drop_output(self, fd: int) -> None:
        self._outputs.pop(fd, None)
        self._close_fd(fd)

    async def write(self, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            fd = self._stdin
            if fd is None:
                return
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                ready: asyncio.Future[None] = loop.create_future()
                loop.add_writer(fd, _wake, ready)
                try:
                    await ready
                finally:
                    loop.remove_writer(fd)
                continue
            except OSError as exc:
                raise SandboxError(f"write to process stdin failed: {exc}") from exc
            view = view[n:]

    async def close_stdin(self) -> None:
        """EOF on a pipe; on a pty nothing (as sshd: a terminal has no half-close)."""
        if self._tty or self._stdin is None:
            return
        fd, self._stdin = self._stdin, None
        self._close_fd(fd)

    async def resize(self, size: TermSize) -> None:
        if not self._tty or self._stdin is None:
            return
        rows, cols = min(max(size.rows, 1), 0xFFFF), min(max(size.cols, 1), 0xFFFF)
        with contextlib.suppress(OSError):
            fcntl.ioctl(self._stdin, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

    async def wait(self) -> ExitStatus:
        await self._exited.wait()
        self._close()
        return self._status or ExitStatus(255)

    async def signal(self, signum: int) -> None:
        if not self._closed and 0 < signum <= MAX_SIGNAL:
            with contextlib.suppress(OSError):
                self._sock.send(encode_signal(signum))

    async def kill(self) -> None:
        """Closing the socket hangs the process group up (the listener's worker kills it 2 s later)."""
        self._close()

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            loop = asyncio.get_running_loop()
            loop.remove_reader(self._sock.fileno())
            for fd in self._outputs:
                loop.remove_reader(fd)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        self._sock.close()
        relays.close_quietly(self._held)
        for fd in list(self._owned):
            self._close_fd(fd)
        self._outputs.clear()
        self._stdin = None
        self._exited.set()

    def _close_fd(self, fd: int) -> None:
        if fd in self._owned:
            self._owned.remove(fd)
            with contextlib.suppress(OSError):
                os.close(fd)

    def __del__(self) -> None:
        for fd in getattr(self, "_owned", ()):
            with contextlib.suppress(OSError):
                os.close(fd)
        for name in ("_sock", "_held"):
            sock = getattr(self, name, None)
            if sock is not None:
                sock.close()
