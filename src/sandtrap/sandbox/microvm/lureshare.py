"""The honeypot's end of one VM's lure share: the daemon's events turned into reports of guest paths, and
honeytokens outside the lure's path served from it (``virtiofs.py`` starts the share; ``lure.py`` has the wire)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from sandtrap.config import LureSettings
from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Sandbox, run
from sandtrap.sandbox.microvm import lure

log = logging.getLogger(__name__)

MAX_TOKEN = 32 * 1024


Report = Callable[..., object]  # report(guest path, op=..., bytes=..., offset=...)


class LureShare:
    """The honeypot's end of one VM's lure: its events socket and what a guest path maps to."""

    def __init__(self, settings: LureSettings, directory: Path, events: socket.socket, name: str) -> None:
        self.settings = settings
        self.directory = directory
        self.name = name
        self._events = events
        self._report: Report | None = None
        self._tokens: dict[str, str] = {}  # path in the lure tree -> the honeytoken's path in the guest
        self.hidden = "." + secrets.token_hex(6)  # the honeytokens' directory, not in the root's listing
        self.suppressed = 0
        self.events = 0

    def __del__(self) -> None:  # a handle dropped without close (a honeypot that died): its socket goes too
        with contextlib.suppress(Exception):
            self._events.close()

    def watch(self, report: Report) -> None:
        self._report = report
        with contextlib.suppress(ValueError, RuntimeError):  # no loop or a closed socket: nothing to watch
            asyncio.get_running_loop().add_reader(self._events.fileno(), self._readable)

    def unwatch(self) -> None:
        self._report = None
        with contextlib.suppress(ValueError, RuntimeError, OSError):
            asyncio.get_running_loop().remove_reader(self._events.fileno())

    def add_token(self, guest_path: str, data: bytes, mode: int, mtime: float) -> str:
        """Serve a honeytoken from the lure tree; its path in the guest's lure mount."""
        rel = f"/{self.hidden}/{len(self._tokens)}"
        self._events.send(lure.add_message(rel, data, mode, mtime))
        self._tokens[rel] = guest_path
        return self.settings.path + rel

    def _readable(self) -> None:
        for _ in range(256):  # a batch per wake-up; the rest on the next
            try:
                data = self._events.recv(lure.MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                self.unwatch()
                return
            self.dispatch(data)

    def dispatch(self, data: bytes) -> None:
        event = lure.decode_event(data)
        report = self._report
        if event is None or report is None:
            return
        if event["op"] == "suppressed":
            self.suppressed += event["count"]
            log.warning("VM %s: %d lure events over the rate bound were dropped", self.name, event["count"])
            report(self.settings.path, op="suppressed", bytes=event["count"], offset=0)
            return
        self.events += 1
        path = event["path"]
        token = self._tokens.get(path)
        if token is not None:
            if event["op"] == "open":  # a honeytoken's read is its open (as inotify's IN_OPEN on Docker)
                report(token)
            return
        guest = self.settings.path + (path if path != "/" else "")
        report(guest, op=event["op"], bytes=event["bytes"], offset=event["offset"])

    def close(self) -> None:
        self.unwatch()
        self._events.close()


async def plant_tokens(share: LureShare, box: Sandbox, paths: Sequence[str]) -> None:
    """Honeytokens outside the lure's path, served from it instead: each file's content, mode and time go into
    the lure tree (a directory its listing does not show) and the guest's file becomes a bind mount of that
    one, so its every open reaches the daemon. Files that are not there are left alone."""
    outside = [p for p in paths if not p.startswith(share.settings.path + "/")]
    if not outside:
        return
    times = await run(box, ["stat", "-c", "%Y", *outside])
    mtimes = times.stdout.decode(errors="replace").split()
    binds = []
    for path in outside:
        found = await box.get_file(path, MAX_TOKEN)
        if found is None or found.data is None:
            continue
        mtime = float(mtimes.pop(0)) if mtimes and mtimes[0].isdigit() else time.time()
        served = share.add_token(path, found.data, found.mode, mtime)
        # The daemon adds the file from its control thread: wait for it to be there.
        wait = f"for i in $(seq 100); do test -e {_sh(served)} && break; sleep 0.05; done"
        binds.append(f"{wait}; mount --bind {_sh(served)} {_sh(path)}")
    if binds:
        result = await run(box, ["sh", "-c", " && ".join(binds)], timeout_s=30)
        if not result.ok:
            raise SandboxError(f"bind-mounting honeytokens in the guest: {result.stderr[-300:]!r}")


def _sh(word: str) -> str:
    return "'" + word.replace("'", "'\\''") + "'"
