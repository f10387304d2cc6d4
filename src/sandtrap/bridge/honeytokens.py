"""Per-sandbox honeytokens: lure credentials unique to each box, and a record of every read.

Each box gets its own cloud keys, database password, SSH key and internal API token, planted as
ordinary files. The values go into the session's record (``sandtrap.honeytoken.issued``), so a token
seen later elsewhere names the session that leaked it.

Reads are seen from outside the box, by its backend (:meth:`~sandtrap.sandbox.base.Sandbox.watch_reads`):
on Docker an inotify watch (``IN_OPEN``) on each lure file in the container's overlay ``merged`` directory
fires when any process in the box opens it, and nothing the attacker does inside can see or stop the watch.
Where a backend cannot see reads (a remote engine), tokens are planted and recorded but reads are not seen
(logged once).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import string
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import asyncssh

from sandtrap.config.personas import TOKEN_MARK, LureFile
from sandtrap.sandbox.base import ReadWatch, Sandbox, run

log = logging.getLogger(__name__)


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


def lures(files: Sequence[LureFile]) -> list[Token]:
    """A persona's own lure files (``personas[].lures``), kind ``lure``: ``{token}`` in a file's text becomes a
    value unique to this box (its value); a file without one is known by the start of its sha256."""
    out = []
    for lure in files:
        value = secrets.token_hex(12)
        if TOKEN_MARK in lure.content:
            content = lure.content.replace(TOKEN_MARK, value).encode()
        else:
            content = lure.content.encode()
            value = "sha256:" + hashlib.sha256(content).hexdigest()[:16]
        out.append(Token("lure", lure.path, value, content, lure.mode))
    return out


async def plant(sandbox: Sandbox, tokens: list[Token]) -> None:
    """Write the lure files, dated weeks or months back like the rest of a lived-in box."""
    dirs = sorted({os.path.dirname(t.path) for t in tokens})
    await run(sandbox, ["mkdir", "-p", *dirs])
    for token in tokens:
        age_s = secrets.randbelow(200 * 86400) + 20 * 86400
        await sandbox.put_file(token.path, token.content, token.mode, mtime=time.time() - age_s)


Reporter = Callable[..., object]  # (kind, path in the box, **detail the backend saw: op, bytes, offset)


class ReadWatcher:
    """Reads of each box's lure files, reported to the session using the box now.

    The watching is the backend's (:meth:`~sandtrap.sandbox.base.Sandbox.watch_reads`): inotify on the box's
    files on this host for Docker, the lure file system's own records for a VM."""

    def __init__(self) -> None:
        self._watches: dict[str, ReadWatch] = {}
        # Per box, the sessions in it now, newest last: a read goes to the newest (source_ip affinity can
        # put several connections in one box; when the newest ends, the one before it gets them again).
        self._reporters: dict[str, list[Reporter]] = {}
        self._warned = False

    async def watch(self, sandbox: Sandbox, tokens: list[Token]) -> bool:
        """Watch the box's lure files; False (logged once) where its backend cannot see reads."""
        kinds = {t.path: t.kind for t in tokens}
        box = sandbox.id

        def seen(path: str, **detail: object) -> None:
            reporters = self._reporters.get(box)
            reporter = reporters[-1] if reporters else None
            if reporter is not None:  # not a token: a file of the backend's lure tree (micro-VMs)
                reporter(kinds.get(path, "lure"), path, **detail)

        watch = await sandbox.watch_reads(list(kinds), seen)
        if watch is None:
            if not self._warned:
                self._warned = True
                log.warning("honeytoken reads cannot be watched (the backend cannot see reads in its boxes here)")
            return False
        self.forget(box)
        self._watches[box] = watch
        return True

    def report_to(self, sandbox_id: str, reporter: Reporter) -> None:
        """Reads in this box are reported to ``reporter`` (the session that came into the box last)."""
        self._reporters.setdefault(sandbox_id, []).append(reporter)

    def withdraw(self, sandbox_id: str, reporter: Reporter) -> None:
        """``reporter``'s session is over (or its own reads begin): reads go to the session before it, if any."""
        reporters = self._reporters.get(sandbox_id, [])
        if reporter in reporters:
            reporters.remove(reporter)
        if not reporters:
            self._reporters.pop(sandbox_id, None)

    def forget(self, sandbox_id: str) -> None:
        watch = self._watches.pop(sandbox_id, None)
        if watch is not None:
            watch.close()
        self._reporters.pop(sandbox_id, None)

    def close(self) -> None:
        for box in list(self._watches):
            self.forget(box)
