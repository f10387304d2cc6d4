"""The detection battery (battery.py) against sandtrap over SSH and against a plain container by docker exec.

Sandtrap: one honeypot, two connections. Box A gets an interactive login on a terminal first (its
banner is the first login's), then every exec, ``ssh -t`` and shell check, then a second login;
box B's connection tries a wrong password before the right one. The plain column: two hardened
containers from the same image without our session layer, private cgroup namespace or lxcfs,
reached the way a naive container honeypot reaches them (``sh -c``, ``bash`` on a TTY).

Only 127.0.0.1 is ever contacted; network properties are read from interfaces and routes.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol

import asyncssh
import pytest
from battery import (
    CHECKS,
    Check,
    Context,
    Expected,
    Outcome,
    Result,
    checks_for,
    expected_here,
    key,
    markdown,
    outcome,
)

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.base import Process, TermSize
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.sandbox import DockerSandbox

from sandtrap_fixtures import BACKEND

PASSWORD = "hunter2"
TIMEOUT_S = 30.0
COLS, ROWS = 200, 50
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]|\x1b\][^\x07]*\x07|\x1b[=>]")
_PROMPT = re.compile(r"[#$] $")


def clean(raw: bytes) -> str:
    """What a terminal shows, as text: escape sequences and carriage returns removed."""
    text = _ANSI.sub("", raw.decode("utf-8", "replace"))
    return text.replace("\r\n", "\n").replace("\r", "")


class Shell:
    """An interactive shell on a terminal, driven as a person (or a bot) types: one line at a time.

    Each command is wrapped in markers the shell prints (``printf`` joins them, so the terminal's echo
    of the typed line never contains them); the text between them is the command's output.
    """

    def __init__(self, read: Callable[[], Awaitable[bytes]], write: Callable[[bytes], Awaitable[None]]) -> None:
        self._read = read
        self._write = write
        self._buf = b""
        self._n = 0
        self.banner = ""

    async def _until(self, done: Callable[[str], bool]) -> str:
        async with asyncio.timeout(TIMEOUT_S):
            while not done(clean(self._buf)):
                data = await self._read()
                if not data:
                    raise EOFError(clean(self._buf)[-500:])
                self._buf += data
        text, self._buf = clean(self._buf), b""
        return text

    async def start(self) -> Shell:
        self.banner = await self._until(lambda t: _PROMPT.search(t) is not None)
        return self

    async def run(self, command: str) -> tuple[str, int | None]:
        self._n += 1
        n = self._n
        begin, end = f"__BT_B{n}_", re.compile(rf"__BT_E{n}_(\d+)\n")
        line = f"printf '%s%s_\\n' __BT_B {n}; {command}; printf '\\n%s%s_%s\\n' __BT_E {n} $?\n"
        await self._write(line.encode())
        text = await self._until(lambda t: end.search(t) is not None and _PROMPT.search(t) is not None)
        m = end.search(text)
        assert m is not None
        body = text[text.index(begin + "\n") + len(begin) + 1 : m.start()] if begin + "\n" in text else ""
        return body.removesuffix("\n"), int(m.group(1))


class Target(Protocol):
    ctx: Context

    async def exec(self, command: str, tty: bool) -> Result: ...

    async def shell(self) -> Shell: ...


class SshTarget:
    """A connection to the honeypot, as an asyncssh client (a bot's view)."""

    def __init__(self, conn: asyncssh.SSHClientConnection) -> None:
        self.conn = conn
        key = conn.get_server_host_key()
        self.ctx = Context(
            client_ip=conn.get_extra_info("sockname")[0],
            client_port=conn.get_extra_info("sockname")[1],
            server_version=conn.get_extra_info("server_version"),
            host_key_sha256=key.get_fingerprint("sha256") if key else None,
        )

    async def exec(self, command: str, tty: bool) -> Result:
        term: dict[str, Any] = {"term_type": "xterm", "term_size": (COLS, ROWS)} if tty else {}
        r = await self.conn.run(command, timeout=TIMEOUT_S, **term)
        out = str(r.stdout or "")
        return Result(out.replace("\r\n", "\n") if tty else out, str(r.stderr or ""), r.exit_status, self.ctx)

    async def shell(self) -> Shell:
        proc = await self.conn.create_process(term_type="xterm", term_size=(COLS, ROWS), encoding=None)

        async def write(data: bytes) -> None:
            proc.stdin.write(data)

        return await Shell(lambda: proc.stdout.read(65536), write).start()


class DockerTarget:
    """A plain container reached by ``docker exec``: what a honeypot without a session layer shows."""

    ctx = Context()

    def __init__(self, sandbox: DockerSandbox) -> None:
        self.sandbox = sandbox
        self.opened: list[Process] = []

    async def exec(self, command: str, tty: bool) -> Result:
        proc = await self.sandbox.exec(["sh", "-c", command], tty=TermSize(COLS, ROWS) if tty else None)
        if not tty:
            await proc.close_stdin()
        out, err = bytearray(), bytearray()
        async with asyncio.timeout(TIMEOUT_S):
            while (chunk := await proc.read()) is not None:
                (err if chunk.stream == 2 else out).extend(chunk.data)
            status = await proc.wait()
        text = clean(bytes(out)) if tty else out.decode("utf-8", "replace")
        return Result(text, err.decode("utf-8", "replace"), status.code, self.ctx)

    async def shell(self) -> Shell:
        proc = await self.sandbox.exec(["bash"], tty=TermSize(COLS, ROWS))

        async def read() -> bytes:
            chunk = await proc.read()
            return chunk.data if chunk is not None else b""

        self.opened.append(proc)
        return await Shell(read, proc.write).start()

    async def close(self) -> None:
        for proc in self.opened:
            await proc.kill()


async def run_battery(a: Target, b: Target) -> dict[str, Result]:
    """Every check in order: box A's first login opens before anything else; B after A."""
    results: dict[str, Result] = {}
    first = await a.shell()
    second: Shell | None = None
    for check in CHECKS:
        if check.box != "A":
            continue
        if check.mode == "pty":
            if check.second_login and second is None:
                second = await a.shell()
            shell = second if check.second_login and second is not None else first
            out, code = await shell.run(check.command)
            results[key(check)] = Result(out, "", code, a.ctx, banner=shell.banner)
        else:
            results[key(check)] = await a.exec(check.command, tty=check.mode == "exec+pty")
    for check in CHECKS:
        if check.box == "B":
            results[key(check)] = await b.exec(check.command, tty=check.mode == "exec+pty")
        elif check.across:
            results[key(check)].other = await b.exec(check.command, tty=check.mode == "exec+pty")
    return results


class _WrongPasswordFirst(asyncssh.SSHClient):
    """A bot working through a list: one wrong password, then the right one, on one connection."""

    def __init__(self) -> None:
        self._passwords = ["letmein", PASSWORD]

    def password_auth_requested(self) -> str | None:
        return self._passwords.pop(0) if self._passwords else None


async def connect(port: int, wrong_first: bool = False) -> asyncssh.SSHClientConnection:
    options: dict[str, Any] = {"client_factory": _WrongPasswordFirst} if wrong_first else {"password": PASSWORD}
    return await asyncssh.connect(
        "127.0.0.1", port, username="root", known_hosts=None, client_keys=None, preferred_auth="password", **options
    )


async def started(backend: DockerBackend) -> DockerSandbox:
    """A plain box once its init has started the daemons (sshd is the last)."""
    box = await backend.create()
    for _ in range(100):
        r = await DockerTarget(box).exec("pgrep -x sshd", tty=False)
        if r.code == 0:
            return box
        await asyncio.sleep(0.1)
    raise AssertionError("plain box: sshd did not start")


def vars_of(r: Result) -> dict[str, Any]:
    """A result as JSON: what each box answered, for whoever reads a failure."""
    other = vars_of(r.other) if r.other else None
    return {"out": r.out, "err": r.err, "code": r.code, "banner": r.banner, "other": other}


# What an nspawn box passes that a Docker container cannot (battery.py's expectations are Docker's): nspawn
# bind-mounts none of /etc's files (resolv-conf=off, no engine) and gives each machine a boot_id of its own.
NSPAWN_PASSES = {"etc-bind-mounts", "boot-id-unique"}


def expected(check: Check, plain: Outcome) -> Expected:
    """battery.py's expectation on this host, for this suite's backend."""
    if BACKEND == "nspawn" and check.id in NSPAWN_PASSES:
        return "pass"
    return expected_here(check, plain)


def table(rows: list[tuple[Check, Outcome, Outcome]]) -> str:
    width = max(len(key(c)) for c, _, _ in rows)
    out = [f"{'check':<{width}}  {'sandtrap':<24}  plain container"]
    for check, ours, plain in rows:
        exp = expected(check, plain)
        note = "" if exp == "pass" else f" ({exp})"
        flag = "" if (ours == "pass") == (exp == "pass") else "  <-- not as expected"
        out.append(f"{key(check):<{width}}  {ours + note:<24}  {plain}{flag}")
    return "\n".join(out)


# The box's eth0 ends in the gateway namespace the honeypot creates (and removes); names resolve in 198.18.0.0/15.
CAPTURE = {"mode": "capture", "dns": {"answer_subnet": "198.18.0.0/15"}}


# init (the default): logins started by the box's listener (no-orphan-roots and sshd-ancestry pass); exec: each
# login a `docker exec` (what a honeypot that is not root on the engine's host falls back to); systemd: the
# listener's logins with systemd as the boxes' PID 1 (sandbox.init: systemd; systemd-answers passes).
@pytest.mark.parametrize(
    ("transport", "init"),
    [("exec", "sandtrap"), ("init", "sandtrap"), ("init", "systemd")],
    ids=["exec", "init", "systemd"],
)
async def test_detection_battery(
    transport: str,
    init: str,
    honeypot: Callable[..., Any],
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    output_dir: Path,
) -> None:
    if BACKEND == "nspawn" and transport == "exec":
        # README "nspawn boxes": logins always go through the listener (there is no docker exec): this run would
        # repeat the init one under another name
        pytest.skip("nspawn boxes have no session_transport: exec (README: nspawn boxes)")
    # Every realism option on, `network: capture` included (eth0 on the capture gateway: README "Network").
    hp = await honeypot(sandbox={"session_transport": transport, "init": init}, network=CAPTURE)
    conn_a = await connect(hp.port)
    conn_b = await connect(hp.port, wrong_first=True)
    try:
        ours = await run_battery(SshTarget(conn_a), SshTarget(conn_b))
    finally:
        conn_a.close()
        conn_b.close()

    plain_backend = backend_factory(
        sandbox_settings(docker={"cgroupns": "host"}, lxcfs_dir="", loadavg_dir="", init="sandtrap")
    )
    p1, p2 = await asyncio.gather(started(plain_backend), started(plain_backend))
    t1, t2 = DockerTarget(p1), DockerTarget(p2)
    try:
        plain = await run_battery(t1, t2)
    finally:
        await t1.close()
        await t2.close()

    rows: list[tuple[Check, Outcome, Outcome]] = []
    for check in checks_for(transport, init):
        plain_result = None if check.needs_ssh else plain[key(check)]
        rows.append((check, outcome(check, ours[key(check)]), outcome(check, plain_result)))
    print("\n" + table(rows))
    # README's table is the run with every realism option on (init: systemd, off by default); the others are
    # named by what differs: `-init` (the defaults: sandtrap's init), `-exec` (logins by docker exec).
    suffix = "" if init == "systemd" else f"-{transport}"
    (output_dir / f"realism-battery{suffix}.md").write_text(markdown(rows), encoding="utf-8")
    raw = {key(c): {"sandtrap": vars_of(ours[key(c)]), "plain": vars_of(plain[key(c)])} for c in CHECKS}
    (output_dir / f"realism-battery{suffix}-raw.json").write_text(json.dumps(raw, indent=1), encoding="utf-8")

    assert len(CHECKS) >= 40
    assert len({key(c) for c in CHECKS}) == len(CHECKS), "check ids repeat within a mode"
    wrong = {
        key(check): (ours_outcome, expected(check, plain_outcome), ours[key(check)].out[-300:])
        for check, ours_outcome, plain_outcome in rows
        if (ours_outcome == "pass") != (expected(check, plain_outcome) == "pass")
    }
    assert not wrong, "sandtrap's outcomes differ from battery.py's expectations (update the battery or fix it)"
