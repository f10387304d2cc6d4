"""The honeypot's own way into a guest: QEMU's guest agent (``qemu-ga``, Debian's ``qemu-guest-agent``, as cloud
VMs run it) on the virtio-serial port ``org.qemu.guest_agent.0``, reached through the socket QEMU listens on in the
VM's state directory.

Nothing of it is a login: no sshd, PAM, utmp, auth.log or TCP connection in the guest, where an SSH connection of
the honeypot's own showed in all of them. Commands run to their end (``guest-exec``, then ``guest-exec-status``
until it exited); files are read with ``guest-file-*``. A streaming process (a pty, stdin after the start) still
needs SSH (guest.py): the seam's ``exec``, not a login's.

The protocol (QEMU's qga/qapi-schema.json, docs/interop/qemu-ga.rst): one JSON command per line, one JSON reply.
After each (re)connect ``guest-sync-delimited`` discards whatever an earlier client left half-said: its reply comes
after a 0xFF byte, with the id we sent.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import secrets
import signal
import weakref
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Argv, ExitStatus, RunResult

CALL_TIMEOUT_S = 15.0  # one command's reply (the guest's one vCPU under TCG on a loaded host)
CONNECT_TIMEOUT_S = 5.0
LINE_LIMIT = 64 << 20  # a reply line: 16 MiB of output per stream, base64, twice
CAPTURE_MAX = 16 << 20  # what qemu-ga keeps of each stream of a guest-exec (GUEST_EXEC_MAX_OUTPUT)
READ_CHUNK = 4 << 20  # a file read in pieces of this size (each one reply of the agent)
# guest-exec-status asked after these pauses (a round trip is about 1 ms): most commands of ours end in tens of ms.
POLL_FIRST_S = 0.005
POLL_GROWTH = 1.5
POLL_MAX_S = 0.1
DELIMITER = b"\xff"
# A reply's JSON structure: a few fields; its big parts are base64 strings, which hold none of these bytes. More is
# not the agent's (root in the guest can take its port over): refused before parsing, as is anything but an object.
STRUCTURE_MAX = 64
# What a management command's environment holds (guest-exec replaces the agent's whole environment with it).
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/root",
    "USER": "root",
    "LOGNAME": "root",
    "LANG": "C.UTF-8",
}
# As another user without PAM (runuser logs a session in auth.log): setpriv with the account's groups.
AS_USER = 'u="$1"; shift; exec setpriv --reuid="$u" --regid="$(id -g -- "$u")" --init-groups -- "$@"'
# Output larger than qemu-ga keeps: compressed in the guest, stdout only (the listing of a disk).
GZIPPED = 'set -o pipefail; "$@" | gzip -1 -c'
# An argv JSON cannot carry (bytes that are not UTF-8): NUL-separated in base64, split again by the guest's bash.
DECODE_ARGV = 'mapfile -d "" -t a < <(printf %s "$1" | base64 -d) && exec "${a[@]}"'


def _as_text(word: str | bytes) -> str | None:
    try:
        text = word.decode("utf-8") if isinstance(word, bytes) else word
        text.encode("utf-8")  # a str with surrogates (a name read as surrogateescape) has no JSON form
    except UnicodeError:
        return None
    return text


def _raw(word: str | bytes) -> bytes:
    return word.encode("utf-8", "surrogateescape") if isinstance(word, str) else word


def command(argv: Argv, user: str, max_output: int) -> list[str]:
    """The argv the agent runs: in a session of its own (``setsid``: its group is what a timeout kills),
    as ``user``, its stdout compressed when more than the agent keeps may be wanted."""
    if not argv:
        raise SandboxError("run: empty argv")
    if any(b"\0" in _raw(w) for w in argv):
        raise SandboxError("run: an argument holds a NUL byte")
    texts = [_as_text(w) for w in argv]
    words: list[str] = [t for t in texts if t is not None]
    if len(words) != len(texts):
        packed = base64.b64encode(b"\0".join(_raw(w) for w in argv)).decode()
        words = ["bash", "-c", DECODE_ARGV, "bash", packed]
    if max_output > CAPTURE_MAX:
        words = ["bash", "-c", GZIPPED, "bash", *words]
    if user != "root":
        words = ["sh", "-c", AS_USER, "sh", user, *words]
    return ["setsid", "-w", *words]


def parse_reply(line: bytes) -> dict[str, Any]:
    """One reply line as the agent writes it (a JSON object); SandboxError for anything else."""
    if sum(line.count(c) for c in (b",", b"[", b"{")) > STRUCTURE_MAX:
        raise SandboxError("not a reply of the guest agent (too much structure)")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise SandboxError(f"not a reply of the guest agent: {exc}") from None
    if not isinstance(reply, dict):
        raise SandboxError("not a reply of the guest agent (not an object)")
    return reply


def exit_status(reply: Mapping[str, Any]) -> ExitStatus:
    number = reply.get("signal")
    if isinstance(number, int) and 0 < number < 128:
        try:
            name = signal.Signals(number).name.removeprefix("SIG")
        except ValueError:
            name = str(number)
        return ExitStatus(128 + number, name)
    code = reply.get("exitcode")
    return ExitStatus(code if isinstance(code, int) and 0 <= code <= 255 else 255)


def output(reply: Mapping[str, Any], key: str, max_output: int, gzipped: bool = False) -> bytes:
    value = reply.get(key, "")
    try:
        data = base64.b64decode(value) if isinstance(value, str) else b""
    except ValueError:
        data = b""
    if gzipped:
        inflate = zlib.decompressobj(wbits=31)
        with contextlib.suppress(zlib.error):  # cut short (more than the agent keeps): what came before
            return inflate.decompress(data, max_output)
        return b""
    return data[:max_output]


# QEMU's socket chardev serves one client at a time (a second one waits unanswered in its backlog): every object
# of this process for one VM (a backend's and a reconciling backend's) shares one agent, and so its connection.
# (A VM's state directory, where the socket is, has a random name of its own: never another VM's.)
_SHARED: weakref.WeakValueDictionary[Path, GuestAgent] = weakref.WeakValueDictionary()


def for_vm(path: Path, name: str, is_alive: Callable[[], bool]) -> GuestAgent:
    """The agent at ``path``: the one an object of this process already has, else a new one."""
    agent = _SHARED.get(path)
    if agent is None:
        agent = GuestAgent(path, name, is_alive)
        _SHARED[path] = agent
    return agent


class GuestAgent:
    """One connection to a VM's guest agent, made on first use and again after a failure; one command at a time."""

    def __init__(self, path: Path, name: str, is_alive: Callable[[], bool]) -> None:
        self._path = path
        self.name = name
        self._is_alive = is_alive
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    def _same_loop(self) -> None:
        """A connection and lock of another event loop (a test's, gone) are dropped, never used."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._writer is not None:
                with contextlib.suppress(RuntimeError, OSError):
                    self._writer.close()
            self._loop, self._lock, self._reader, self._writer = loop, asyncio.Lock(), None, None

    async def _connect(self) -> None:
        if not self._is_alive():
            raise SandboxError(f"VM {self.name} is not running")
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                reader, writer = await asyncio.open_unix_connection(str(self._path), limit=LINE_LIMIT)
        except (OSError, TimeoutError) as exc:
            raise SandboxError(f"cannot reach {self.name}'s guest agent at {self._path}: {exc!r}") from exc
        self._reader, self._writer = reader, writer
        token = secrets.randbelow(1 << 31)
        writer.write(DELIMITER + json.dumps({"execute": "guest-sync-delimited", "arguments": {"id": token}}).encode())
        writer.write(b"\n")
        await writer.drain()
        while True:  # a reply to an earlier client's command may come first: skip to ours
            await reader.readuntil(DELIMITER)
            line = await reader.readline()
            with contextlib.suppress(SandboxError):
                if parse_reply(line).get("return") == token:
                    return

    def _drop(self) -> None:
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def call(
        self, name: str, arguments: Mapping[str, Any] | None = None, timeout_s: float = CALL_TIMEOUT_S
    ) -> Any:
        """Run one agent command; its ``return`` value. A command the agent refuses raises SandboxError."""
        self._same_loop()
        async with self._lock:
            try:
                async with asyncio.timeout(timeout_s):
                    if self._writer is None:
                        await self._connect()
                    assert self._reader is not None and self._writer is not None
                    message: dict[str, Any] = {"execute": name}
                    if arguments:
                        message["arguments"] = arguments
                    self._writer.write(json.dumps(message).encode() + b"\n")
                    await self._writer.drain()
                    line = await self._reader.readline()
                    if not line:
                        raise ConnectionError("the agent's socket closed")
                    reply = parse_reply(line)
            except SandboxError:
                self._drop()
                raise
            except (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError) as exc:
                self._drop()  # what is in flight is unknown now: the next command syncs again
                raise SandboxError(f"{self.name}'s guest agent, {name}: {exc!r}") from exc
            except BaseException:
                self._drop()
                raise
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise SandboxError(f"{self.name}'s guest agent refused {name}: {str(desc)[:300]}")
        return reply.get("return")

    async def call_object(self, name: str, arguments: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """:meth:`call` for a command whose ``return`` is an object."""
        result = await self.call(name, arguments)
        if not isinstance(result, dict):
            raise SandboxError(f"{self.name}'s guest agent: {name} did not return an object")
        return result

    async def run(
        self,
        argv: Argv,
        stdin: bytes = b"",
        *,
        user: str = "root",
        max_output: int = 4 << 20,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
    ) -> RunResult:
        """``argv`` run to its end in the guest, as :func:`sandtrap.sandbox.base.run` does it over ``exec``.
        With ``timeout_s`` its process group is killed and :class:`TimeoutError` raised."""
        path, *args = command(argv, user, max_output)
        arguments: dict[str, Any] = {
            "path": path,
            "arg": args,
            "env": [f"{k}={v}" for k, v in {**BASE_ENV, **(env or {})}.items()],
            "capture-output": True,
        }
        if stdin:
            arguments["input-data"] = base64.b64encode(stdin).decode()
        pid = (await self.call_object("guest-exec", arguments)).get("pid")
        if not isinstance(pid, int):
            raise SandboxError(f"{self.name}'s guest agent: guest-exec gave no pid")
        try:
            async with asyncio.timeout(timeout_s):
                reply = await self._until_exited(pid)
        except BaseException:
            await asyncio.shield(self._kill(pid))
            raise
        gzipped = max_output > CAPTURE_MAX
        return RunResult(
            exit_status(reply), output(reply, "out-data", max_output, gzipped), output(reply, "err-data", max_output)
        )

    async def _until_exited(self, pid: int) -> Mapping[str, Any]:
        wait = POLL_FIRST_S
        while True:
            reply = await self.call_object("guest-exec-status", {"pid": pid})
            if reply.get("exited") is True:
                return reply
            await asyncio.sleep(wait)
            wait = min(wait * POLL_GROWTH, POLL_MAX_S)

    async def _kill(self, pid: int) -> None:
        """Its whole group (setsid made it the leader), then its status read once (the agent forgets it then)."""
        with contextlib.suppress(SandboxError):
            await self.call("guest-exec", {"path": "kill", "arg": ["-KILL", "--", f"-{pid}"]})
            for _ in range(20):
                if (await self.call_object("guest-exec-status", {"pid": pid})).get("exited") is True:
                    return
                await asyncio.sleep(0.1)

    async def read_file(self, path: str, max_bytes: int, timeout_s: float) -> bytes:
        """Up to ``max_bytes + 1`` bytes of ``path`` (one more tells the caller it is longer), read by ``dd`` in
        chunks the agent can carry (a file the attacker made a FIFO meanwhile blocks a process, not the agent)."""
        data = bytearray()
        while len(data) <= max_bytes:
            start = len(data) // READ_CHUNK
            argv = [
                "dd",
                f"if={path}",
                f"bs={READ_CHUNK}",
                f"skip={start}",
                "count=1",
                "iflag=fullblock",
                "status=none",
            ]
            result = await self.run(argv, max_output=READ_CHUNK, timeout_s=timeout_s)
            if not result.ok:
                raise SandboxError(f"read {path} in {self.name}: {result.stderr[-300:]!r}")
            data += result.stdout
            if len(result.stdout) < READ_CHUNK:
                break
        return bytes(data[: max_bytes + 1])

    async def ping(self, timeout_s: float = CALL_TIMEOUT_S) -> None:
        await self.call("guest-ping", timeout_s=timeout_s)

    def close(self) -> None:
        self._drop()
