"""login(1) on a telnet connection, before the box: its prompts, its line editing, its timing.

:class:`Keyboard` holds what the client typed (bounded), read a line at a time as a terminal in canonical mode
gives it to login (erase, kill, echo or not); :func:`login` is login's dialog with the shared
:class:`~sandtrap.bridge.auth.AuthPolicy` deciding: ``<hostname> login: ``, ``Password: ``, a wrong password
answered after pam_faildelay with a blank line and ``Login incorrect``, at most LOGIN_RETRIES tries.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

from sandtrap.bridge.auth import AttemptState, AuthPolicy
from sandtrap.bridge.connection import Connection, printable
from sandtrap.config import TelnetSettings
from sandtrap.events import AUTH_TOO_MANY, LOGIN_FAILED, LOGIN_SUCCESS
from sandtrap.telnet import protocol as tp

MAX_PENDING = 64 * 1024  # input held before the shell starts (typed ahead of the prompt)
MAX_NAME = 256  # login(1) reads at most this much of a user name or password


class Keyboard:
    """The client's keystrokes before the shell: ``write`` sends to the client, ``echoes`` says whether the server
    echoes (telnet ECHO on our side)."""

    def __init__(self, write: Callable[[bytes], None], echoes: Callable[[], bool]) -> None:
        self.pending = bytearray()
        self.eof = False
        self.write = write
        self._echoes = echoes
        self._event = asyncio.Event()

    def typed(self, data: bytes) -> bool:
        """Keep ``data``; False (dropped) past :data:`MAX_PENDING`."""
        if len(self.pending) + len(data) > MAX_PENDING:
            return False
        self.pending += data
        self.poke()
        return True

    def end(self) -> None:
        self.eof = True
        self.poke()

    def poke(self) -> None:
        """Something changed (input, an option, the end): waiters look again."""
        self._event.set()

    async def changed(self) -> None:
        self._event.clear()
        await self._event.wait()

    def take(self) -> bytes:
        data, self.pending = bytes(self.pending), bytearray()
        return data

    async def line(self, echo: bool) -> bytes | None:
        """One line (erase, kill), echoed or not; None at EOF."""
        line = bytearray()
        while True:
            while not self.pending:
                if self.eof:
                    return None
                await self.changed()
            b = self.pending[0]
            del self.pending[0]
            shown = echo and self._echoes()
            if b in (13, 10):
                if echo:
                    self.write(b"\r\n")
                return bytes(line)
            if b in (8, 127):
                if line:
                    line.pop()
                    if shown:
                        self.write(b"\b \b")
            elif b == 21:  # ^U
                if shown:
                    self.write(b"\b \b" * len(line))
                line.clear()
            elif b == 0:
                continue
            elif len(line) < MAX_NAME:
                line.append(b)
                if shown:
                    self.write(tp.escape(bytes([b])))


async def login(
    keys: Keyboard,
    link: Connection,
    policy: AuthPolicy,
    settings: TelnetSettings,
    hostname: str,
    hint: str = "",
) -> bool:
    """login(1)'s dialog; True once a password is accepted (the lease is started then). ``hint``: a user name the
    client sent (telnet -l USER, by NEW-ENVIRON): login asks for its password only."""
    write = keys.write
    attempts = AttemptState()
    failures = 0
    username = ""
    while failures < settings.login_retries:
        if hint:
            username, hint = hint[:MAX_NAME], ""
        else:
            write(f"{hostname} login: ".encode())
            line = await keys.line(echo=True)
            if line is None:
                return False
            username = line.decode("utf-8", "replace")
            if not username:
                continue
        write(b"Password: ")
        raw = await keys.line(echo=False)
        if raw is None:
            return False
        write(b"\r\n")
        password = raw.decode("utf-8", "replace")
        decision = policy.check_password(attempts, link.src_ip, username, password)
        link.emitter.emit(
            LOGIN_SUCCESS if decision.accepted else LOGIN_FAILED,
            username=printable(username, 256),
            password=printable(password, 256),
            method="password",
            reason=decision.reason,
        )
        if decision.accepted:
            link.username, link.password, link.auth_method = username, password, "password"
            link.start_lease()
            return True
        link.login_failed(username, "password")
        failures += 1
        await asyncio.sleep(settings.failure_delay_s * random.uniform(0.9, 1.1))
        write(b"\r\nLogin incorrect\r\n")
    link.emitter.emit(AUTH_TOO_MANY, username=printable(username, 256), attempts=failures)
    link.close_reason = "login_retries"
    return False
