"""login(1) as telnetd starts it, answered by the honeypot: ``/bin/login -p -h HOST [USER]``, no ``-f``.

Debian's inetutils telnetd runs ``/bin/login -p -h HOST`` (with the client's USER, sent by NEW-ENVIRON, as its
last argument): login itself prompts and checks the password. The honeypot's front end has already shown those
prompts and taken the attacker's answers (the box's account carries the password the attacker typed, see
``ensure_account``), so it answers login's own prompts on the pty with them and passes on only what comes after
the password (the motd, "Last login", the shell): ``ps`` in the box shows login's arguments as on a server, with
no ``-f``. Whatever cannot be answered this way (no password, control characters, a prompt that does not come,
the box's "Login incorrect") is started as before with ``login -f`` (the caller's fall-back): the session never
fails because of this.
"""

from __future__ import annotations

import asyncio

from sandtrap.sandbox.base import STDOUT, Chunk, ExitStatus, Process, TermSize

LOGIN_PROMPT = b" login: "
PASSWORD_PROMPT = b"Password: "
MAX_DIALOGUE = 16384  # bytes of login's output read for its prompts, at most
DIALOGUE_TIMEOUT_S = 10.0
MAX_ANSWER = 255  # a name or password longer than this goes by login -f (a pty's line holds 4095)


def answerable(username: str, password: str) -> bool:
    """Whether login's prompts can be answered with these through a pty's line discipline: a password (an empty
    one cannot match the box's account), printable (no erase, kill, interrupt or end-of-file), short."""
    return bool(password) and all(0 < len(s) <= MAX_ANSWER and s.isprintable() for s in (username, password))


class AnsweredLogin:
    """The login's process after its prompts: what followed the password comes first, then the process's own."""

    def __init__(self, process: Process, first: bytes) -> None:
        self._process = process
        self._first = first

    async def read(self) -> Chunk | None:
        if self._first:
            data, self._first = self._first, b""
            return Chunk(STDOUT, data)
        return await self._process.read()

    async def write(self, data: bytes) -> None:
        await self._process.write(data)

    async def close_stdin(self) -> None:
        await self._process.close_stdin()

    async def resize(self, size: TermSize) -> None:
        await self._process.resize(size)

    async def wait(self) -> ExitStatus:
        return await self._process.wait()

    async def kill(self) -> None:
        await self._process.kill()


async def answer(process: Process, username: str, password: str, ask_user: bool) -> AnsweredLogin | None:
    """Answer login's prompts (its "HOST login: " when ``ask_user``, then "Password: ") and drop its output up to
    the newline after the password; None when a prompt does not come in time (the caller kills the process)."""
    buf = b""
    try:
        async with asyncio.timeout(DIALOGUE_TIMEOUT_S):
            while True:
                chunk = await process.read()
                if chunk is None or len(buf) + len(chunk.data) > MAX_DIALOGUE:
                    return None
                buf += chunk.data
                if ask_user:
                    at = buf.find(LOGIN_PROMPT)
                    if at < 0:
                        continue
                    buf, ask_user = buf[at + len(LOGIN_PROMPT) :], False
                    await process.write(username.encode() + b"\n")
                at = buf.find(PASSWORD_PROMPT)
                if at >= 0:
                    break
            await process.write(password.encode() + b"\n")
            rest = buf[at + len(PASSWORD_PROMPT) :]
            # login's newline after the password it read without echo, then its first words: "Login incorrect"
            # (after pam_faildelay) if the box refused the password, else the session's (motd, prompt)
            while b"\n" not in rest or not rest.split(b"\n", 1)[1].strip(b"\r\n"):
                chunk = await process.read()
                if chunk is None or len(rest) + len(chunk.data) > MAX_DIALOGUE:
                    return None
                rest += chunk.data
    except TimeoutError:
        return None
    after = rest.split(b"\n", 1)[1]
    if after.lstrip(b"\r\n").startswith(b"Login incorrect"):
        return None
    return AnsweredLogin(process, after)
