"""A download the gateway served to a box, as Cowrie records it: stored by sha256, ``cowrie.session.file_download``
with ``destfile``, the path the box's client wrote.

The gateway sees the request, not the client: ``destfile`` comes from the session's recent command lines
(:class:`CommandLog`, fed by the event bus): the newest that names the download (its host and path) and is a
``wget``, ``curl``, ``tftp`` or ``ftpget`` (also as ``busybox <applet>``), read as that client reads its
arguments (``-O``/``-P``, ``-o``/``-O``, ``-l``/``-r``, ``[LOCAL] REMOTE``). A relative path stays relative (the
shell's working directory is not known here). Empty when no command names it (a script, a program, a pipe to
standard output): then the file, if kept, is among the session's changed files.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import shlex
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from sandtrap.config import EgressSettings
from sandtrap.events import COMMAND_INPUT, SESSION_FILE_DOWNLOAD, SESSION_FILE_DOWNLOAD_FAILED, Event
from sandtrap.network.fetcher import Failed, Refused
from sandtrap.network.taps import Tap

KEPT_COMMANDS = 10
KEPT_SESSIONS = 1024  # the latest sessions' lines: at most 1024 x 10 x 2 KB
LINE_CHARS = 2048
SEPARATORS = re.compile(r"\|\||&&|[;|&\n]")


@dataclass
class _Line:
    text: str
    claimed: set[int] = field(default_factory=set)  # its commands already matched to a download


class CommandLog:
    """An event sink keeping the last command lines of the latest sessions (a session's first command may come
    before its box is on the gateway: an exec request leases the box); the gateway forgets a session it closes."""

    def __init__(self) -> None:
        self._lines: OrderedDict[str, deque[_Line]] = OrderedDict()

    def forget(self, session: str) -> None:
        self._lines.pop(session, None)

    def write(self, event: Event) -> None:
        if event.eventid != COMMAND_INPUT or not event.session:
            return
        lines = self._lines.get(event.session)
        if lines is None:
            lines = self._lines[event.session] = deque(maxlen=KEPT_COMMANDS)
            while len(self._lines) > KEPT_SESSIONS:
                self._lines.popitem(last=False)
        lines.append(_Line(str(event.get("input", ""))[:LINE_CHARS]))

    def destfile(self, session: str, url: str) -> str:
        """Where the session's command that asked for ``url`` wrote it: the newest line naming it, its first
        command not yet matched to a download (``a; b`` both fetching one URL: a's, then b's)."""
        lines = list(reversed(self._lines.get(session, ())))
        first = None
        for index, part, path in candidates(url, [line.text for line in lines]):
            first = path if first is None else first
            if part not in lines[index].claimed:
                lines[index].claimed.add(part)
                return path
        return first or ""


def _words(part: str) -> list[str]:
    try:
        words = shlex.split(part)
    except ValueError:
        words = part.split()
    while words and (("=" in words[0] and not words[0].startswith("-")) or words[0] in ("sudo", "nohup", "exec")):
        words = words[1:]
    if words and posixpath.basename(words[0]) == "busybox":
        words = words[1:]
    if words:
        words[0] = posixpath.basename(words[0])
    return words


def _option(words: list[str], shorts: tuple[str, ...], longs: tuple[str, ...]) -> str | None:
    """The value of the last of these options (``-o x``, ``-ox``, ``--output x``, ``--output=x``)."""
    found = None
    for i, word in enumerate(words):
        for opt in shorts + longs:
            if word == opt and i + 1 < len(words):
                found = words[i + 1]
            elif opt in longs and word.startswith(opt + "="):
                found = word[len(opt) + 1 :]
            elif opt in shorts and word.startswith(opt) and len(word) > len(opt):
                found = word[len(opt) :]
    return found


def _names_url(word: str, host: str, path: str) -> bool:
    parts = urlsplit(word if "://" in word else "http://" + word)
    return (parts.hostname or "") == host and unquote(parts.path or "/") == path


def _basename(path: str, default: str = "index.html") -> str:
    return posixpath.basename(path.rstrip("/")) if path.strip("/") else default


def destfile(url: str, lines: list[str]) -> str:
    """Where a client in ``lines`` (newest first) wrote ``url``; '' when none names it or it went to stdout."""
    for _, _, path in candidates(url, lines):
        return path
    return ""


def candidates(url: str, lines: list[str]) -> Iterator[tuple[int, int, str]]:
    """(line, command, path) of each command in ``lines`` (newest first; a line's commands in order) that
    fetches ``url``; path '' for standard output."""
    parts = urlsplit(url)
    host, path = (parts.hostname or "").lower(), unquote(parts.path or "/")
    for index, line in enumerate(lines):
        for number, part in enumerate(SEPARATORS.split(line)):
            words = _words(part)
            if not words:
                continue
            found = _destfile(parts.scheme, host, path, words)
            if found is not None:
                yield index, number, "" if found == "-" else found


def _destfile(scheme: str, host: str, path: str, words: list[str]) -> str | None:
    tool, args = words[0], words[1:]
    if tool in ("wget", "curl") and any(_names_url(w.lower(), host, path) for w in args):
        if tool == "wget":
            out = _option(args, ("-O",), ("--output-document",))
            if out is not None:
                return out
            prefix = _option(args, ("-P",), ("--directory-prefix",))
            name = _basename(path)
            return posixpath.join(prefix, name) if prefix else name
        out = _option(args, ("-o",), ("--output",))
        if out is not None:
            return out
        return (
            _basename(path)
            if any(w in ("-O", "--remote-name") or re.fullmatch(r"-[a-zA-Z]*O", w) for w in args)
            else "-"
        )
    remote = path.lstrip("/")
    if scheme == "tftp" and tool == "tftp" and host in (w.lower() for w in args):
        named = _option(args, ("-r",), ("--remote",))
        if named is not None and named.lstrip("/") == remote:
            return _option(args, ("-l",), ("--local",)) or _basename(named)
        if "get" in args:  # tftp-hpa: tftp HOST -c get REMOTE [LOCAL]
            rest = args[args.index("get") + 1 :]
            if rest and rest[0].lstrip("/") == remote:
                return rest[1] if len(rest) > 1 else _basename(rest[0])
    if scheme == "ftp" and tool == "ftpget":
        plain = _positional(args, with_value=("-u", "-p", "-P", "--username", "--password", "--port"))
        if len(plain) >= 2 and plain[0].lower() == host and plain[-1].lstrip("/") == remote:
            return plain[1] if len(plain) == 3 else _basename(plain[-1])
    return None


def _positional(args: list[str], with_value: tuple[str, ...]) -> list[str]:
    out, skip = [], False
    for word in args:
        if skip:
            skip = False
        elif word in with_value:
            skip = True
        elif not word.startswith("-"):
            out.append(word)
    return out


async def record(tap: Tap, url: str, body: bytes, redirects: list[str] | None = None) -> None:
    """Store ``body`` by sha256 and emit the session's ``file_download`` for it."""
    destination = tap.destfile(url)
    sha, outfile, stored, duplicate = await tap.store(body)
    tap.emit(
        SESSION_FILE_DOWNLOAD,
        url=url,
        outfile=outfile,
        shasum=sha,
        destfile=destination,
        size=len(body),
        stored=stored,
        duplicate=duplicate,
        redirects=redirects or [],
    )


def refusal(tap: Tap, egress: EgressSettings) -> str:
    """Why this session's next download is not fetched ('' when it may be)."""
    if not egress.fetch:
        return "not fetched (network.egress.fetch: false)"
    if tap.fetches >= egress.max_fetches:
        return f"not fetched: the session's {egress.max_fetches} downloads are used up"
    if tap.fetched_bytes >= egress.max_session_bytes:
        return "not fetched: the session's download bytes are used up"
    return ""


async def obtain(
    tap: Tap, egress: EgressSettings, url: str, get: Callable[[int], Awaitable[bytes]], shared: asyncio.Semaphore
) -> bytes | None:
    """A non-HTTP download (FTP, TFTP) for the session: fetched by ``get(room)`` within the session's bounds,
    stored and recorded; None (recorded as failed) when sinkholed, refused or failed. One at a time per session,
    then ``shared`` (the sensor's fetches at once), in the HTTP path's order."""
    async with tap.fetching, shared:
        error = refusal(tap, egress)
        if not error:
            tap.fetches += 1
            try:
                body = await get(min(egress.max_file_bytes, egress.max_session_bytes - tap.fetched_bytes))
            except (Refused, Failed) as exc:
                error = str(exc)[:300]
        if error:
            tap.emit(SESSION_FILE_DOWNLOAD_FAILED, url=url, error=error)
            return None
        tap.fetched_bytes += len(body)
        await record(tap, url, body)
        return body
