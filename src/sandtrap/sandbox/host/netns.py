"""A socket made inside a box's network namespace, from a short-lived thread of its own.

The thread enters the namespace of the box's PID 1 (``setns``), makes the socket (a connect to the box's
listener, or the login's connection to the box's :22), goes back and ends: a thread that entered a box's
namespace is never reused for anything else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import threading
from collections.abc import Callable

from sandtrap.sandbox.host.boxwire import BrokerError

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _in_box_netns(
    pid: int, is_same_box: Callable[[], bool], work: Callable[[], socket.socket], path: str = ""
) -> socket.socket:
    """Runs in a thread of its own, which ends afterwards: enters the box's network namespace (or the one at
    ``path``: the capture gateway's, whose only peers are boxes), makes a socket."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        ns = os.open(path or f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not is_same_box():  # checked after the open: the namespace held is the box's
                raise BrokerError("the box's pid 1 is gone")
            _setns(ns)
        finally:
            os.close(ns)
        try:
            return work()
        finally:
            _setns(own)  # back (if this fails, the thread ends anyway: nothing else runs on it)
    finally:
        os.close(own)


async def in_box_netns(
    pid: int,
    is_same_box: Callable[[], bool],
    work: Callable[[], socket.socket],
    what: str,
    timeout_s: float,
    path: str = "",
) -> socket.socket:
    """The socket ``work`` makes inside the box's network namespace, on a dedicated thread (never the shared
    executor: a thread that entered a box's namespace is not reused); a socket the caller stopped waiting
    for is closed."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[socket.socket] = loop.create_future()

    def deliver(result: socket.socket | None, exc: BaseException | None) -> None:
        if done.cancelled():
            if result is not None:
                result.close()
        elif exc is not None:
            done.set_exception(exc)
        elif result is not None:
            done.set_result(result)

    def run() -> None:
        try:
            sock = _in_box_netns(pid, is_same_box, work, path)
        except BaseException as exc:  # delivered to the caller, never left on this thread
            err = exc if isinstance(exc, BrokerError) else BrokerError(f"cannot reach {what}: {exc!r}")
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits for the error
                loop.call_soon_threadsafe(deliver, None, err)
            return
        try:
            loop.call_soon_threadsafe(deliver, sock, None)
        except RuntimeError:  # the loop is closed
            sock.close()

    threading.Thread(target=run, name=f"broker-netns-{pid}", daemon=True).start()
    async with asyncio.timeout(timeout_s):
        return await done
