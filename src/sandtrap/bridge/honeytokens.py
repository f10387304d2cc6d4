"""Per-sandbox honeytokens: lure credentials unique to each box, and a record of every read.

Each box gets its own cloud keys, database password, SSH key and internal API token, planted as
ordinary files. The values go into the session's record (``sandtrap.honeytoken.issued``), so a token
seen later elsewhere names the session that leaked it.

Reads are seen from the host, not from inside the box: an inotify watch (``IN_OPEN``) on each lure
file in the container's overlay ``merged`` directory fires when any process in the box opens it,
and nothing the attacker does inside can see or stop the watch (no FUSE mount or audit rule to
discover). It needs the engine on this host; with a remote engine, tokens are planted and recorded
but reads are not seen (logged once).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import secrets
import string
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import asyncssh

from sandtrap.sandbox.base import Sandbox

log = logging.getLogger(__name__)

IN_OPEN = 0x00000020
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str  # aws | db_password | ssh_key | api_token
    path: str  # where it lies in the box
    value: str  # what identifies it if it turns up elsewhere (key id, password, fingerprint, token)
    content: bytes
    mode: int = 0o600


def _rand(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


def generate() -> list[Token]:
    """A fresh set of lure credentials, unique to one box."""
    key_id = "AKIA" + _rand(string.ascii_uppercase + string.digits, 16)
    secret = _rand(string.ascii_letters + string.digits + "+/", 40)
    aws = f"[default]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\nregion = eu-central-1\n"
    db_password = _rand(string.ascii_letters + string.digits, 20)
    pgpass = f"db01.corp.internal:5432:inventory:inventory_app:{db_password}\n"
    key = asyncssh.generate_private_key("ssh-ed25519", comment="deploy@ci-runner-02")
    api_token = "itk_" + secrets.token_hex(20)
    api = (
        f"# inventory API (internal)\nINVENTORY_API_URL=https://api.corp.internal/v1\nINVENTORY_API_TOKEN={api_token}\n"
    )
    return [
        Token("aws", "/root/.aws/credentials", key_id, aws.encode()),
        Token("db_password", "/root/.pgpass", db_password, pgpass.encode()),
        Token(
            "ssh_key",
            "/root/.ssh/id_ed25519",
            key.get_fingerprint("sha256"),
            key.export_private_key("openssh"),
        ),
        Token("api_token", "/etc/default/inventory-api", api_token, api.encode(), 0o640),
    ]


async def plant(sandbox: Sandbox, tokens: list[Token]) -> None:
    """Write the lure files, dated weeks or months back like the rest of a lived-in box."""
    dirs = sorted({os.path.dirname(t.path) for t in tokens})
    proc = await sandbox.exec(["mkdir", "-p", *dirs])
    await proc.close_stdin()
    while await proc.read() is not None:
        pass
    await proc.wait()
    for token in tokens:
        age_s = secrets.randbelow(200 * 86400) + 20 * 86400
        await sandbox.put_file(token.path, token.content, token.mode, mtime=time.time() - age_s)


Reporter = Callable[[str, str], object]  # (kind, path in the box)


class ReadWatcher:
    """One inotify descriptor for all boxes; reports opens of lure files to the box's current session."""

    def __init__(self) -> None:
        self._fd = -1
        self._libc: ctypes.CDLL | None = None
        self._watches: dict[int, tuple[str, Token]] = {}  # wd -> (sandbox id, token)
        self._by_box: dict[str, list[int]] = {}
        self._reporters: dict[str, Reporter] = {}
        self._last: dict[int, float] = {}
        self._warned = False

    def _ensure(self) -> bool:
        if self._fd >= 0:
            return True
        name = ctypes.util.find_library("c")
        if name is None:
            return False
        self._libc = ctypes.CDLL(name, use_errno=True)
        fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            return False
        self._fd = fd
        asyncio.get_running_loop().add_reader(fd, self._read)
        return True

    def watch(self, sandbox_id: str, root: Path | None, tokens: list[Token]) -> int:
        """Watch the box's lure files under its host-side root; returns how many are watched."""
        if root is None or not root.is_dir() or not self._ensure():
            if not self._warned:
                self._warned = True
                log.warning("honeytoken reads cannot be watched (the engine's file system is not on this host)")
            return 0
        assert self._libc is not None
        n = 0
        for token in tokens:
            path = os.fsencode(root / token.path.lstrip("/"))
            wd = self._libc.inotify_add_watch(self._fd, path, IN_OPEN)
            if wd < 0:
                log.info("cannot watch %s: errno %d", token.path, ctypes.get_errno())
                continue
            self._watches[wd] = (sandbox_id, token)
            self._by_box.setdefault(sandbox_id, []).append(wd)
            n += 1
        return n

    def report_to(self, sandbox_id: str, reporter: Reporter | None) -> None:
        """Reads in this box are reported to ``reporter`` (the session using the box now)."""
        if reporter is None:
            self._reporters.pop(sandbox_id, None)
        else:
            self._reporters[sandbox_id] = reporter

    def forget(self, sandbox_id: str) -> None:
        for wd in self._by_box.pop(sandbox_id, []):
            self._watches.pop(wd, None)
            self._last.pop(wd, None)
            if self._libc is not None and self._fd >= 0:
                self._libc.inotify_rm_watch(self._fd, wd)
        self._reporters.pop(sandbox_id, None)

    def close(self) -> None:
        if self._fd >= 0:
            asyncio.get_running_loop().remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1

    def _read(self) -> None:
        try:
            data = os.read(self._fd, 64 * 1024)
        except BlockingIOError:
            return
        pos = 0
        now = time.monotonic()
        while pos + _EVENT.size <= len(data):
            wd, mask, _cookie, length = _EVENT.unpack_from(data, pos)
            pos += _EVENT.size + length
            entry = self._watches.get(wd)
            if entry is None or not mask & IN_OPEN:
                continue
            if now - self._last.get(wd, 0.0) < 1.0:  # one record per file per second: `grep -r` opens once
                continue
            self._last[wd] = now
            sandbox_id, token = entry
            reporter = self._reporters.get(sandbox_id)
            if reporter is not None:
                reporter(token.kind, token.path)
