"""The honeypot against asyncssh as the client: odd terminals, floods of env requests, every auth path,
what is recorded about the client (version, HASSH, keys), and how a session ends (status, signal, EOF).

Each test starts its own honeypot on 127.0.0.1 (random port) with every event captured. A connection's
events are told apart by the client's own port, which the server records as ``src_port``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

import asyncssh
import pytest
from asyncssh.public_key import SSHLocalKeyPair

from sandtrap.events import (
    AUTH_TOO_MANY,
    CHANNEL_EXIT,
    CHANNEL_PTY,
    CLIENT_FINGERPRINT,
    CLIENT_KEX,
    CLIENT_SIZE,
    CLIENT_VAR,
    CLIENT_VERSION,
    COMMAND_INPUT,
    LOGIN_FAILED,
    LOGIN_SUCCESS,
    SANDBOX_ASSIGNED,
    SESSION_CLOSED,
    SESSION_CONNECT,
    Event,
)

from sshclient import asyncssh_connected as connect
from sshclient import asyncssh_options as options
from sshd import real_sshd

pytestmark = pytest.mark.timeout(120)

Honeypot = Callable[..., Any]
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


# -- helpers -------------------------------------------------------------------------------------------
async def connect_with(hp: Any, client: asyncssh.SSHClient, **kw: Any) -> asyncssh.SSHClientConnection:
    """Connect with our own SSHClient (its callbacks supply the credentials); the caller closes."""
    kw.setdefault("password", None)
    async with asyncio.timeout(60):
        conn = await asyncssh.connect("127.0.0.1", hp.port, client_factory=lambda: client, **options(**kw))
    return conn


async def session_of(hp: Any, local_port: int) -> str:
    """The server's session id for the connection that came from ``local_port``."""
    (event,) = await hp.wait_for(SESSION_CONNECT, src_port=local_port)
    return str(event.session)


def local_port(conn: asyncssh.SSHClientConnection) -> int:
    return int(conn.get_extra_info("sockname")[1])


def of(hp: Any, eventid: str, session: str, **fields: Any) -> list[Event]:
    return [e for e in hp.events(eventid, session=session) if all(e.get(k) == v for k, v in fields.items())]


class Passwords(asyncssh.SSHClient):
    """Offers the given passwords one after the other (one per failed attempt), then gives up."""

    def __init__(self, passwords: Sequence[str]) -> None:
        self._left = list(passwords)
        self.offered: list[str] = []
        self.port = 0

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.port = local_port(conn)

    def password_auth_requested(self) -> str | None:
        if not self._left:
            return None
        self.offered.append(self._left.pop(0))
        return self.offered[-1]


class KbdInt(asyncssh.SSHClient):
    """Answers keyboard-interactive challenges with the given responses, one per challenge."""

    def __init__(self, responses: Sequence[str]) -> None:
        self._left = list(responses)
        self.prompts: list[list[tuple[str, bool]]] = []
        self.port = 0

    def connection_made(self, conn: asyncssh.SSHClientConnection) -> None:
        self.port = local_port(conn)

    def kbdint_auth_requested(self) -> str | None:
        return "" if self._left else None

    def kbdint_challenge_received(
        self, name: str, instructions: str, lang: str, prompts: Sequence[tuple[str, bool]]
    ) -> list[str] | None:
        self.prompts.append(list(prompts))
        return [self._left.pop(0)] if self._left else None


# -- PTY shells with odd terminal types ------------------------------------------------------------------
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")
MADE_UP_TERM = "sandtrap-made-up-terminal-" + "x" * 26 + "-v1.2.3+"  # 60 characters
assert len(MADE_UP_TERM) == 60


async def read_until(stream: asyncssh.SSHReader[bytes], pattern: re.Pattern[bytes], timeout_s: float = 30.0) -> bytes:
    buf = b""
    async with asyncio.timeout(timeout_s):
        while not pattern.search(buf):
            chunk = await stream.read(4096)
            if not chunk:
                raise AssertionError(f"EOF before {pattern.pattern!r}; got {buf!r}")
            buf += chunk
    return buf


@pytest.mark.parametrize(
    ("term", "size", "stty"),
    [
        ("xterm-256color", (132, 43), "43 132"),
        ("dumb", (5000, 3000), "1000 1000"),  # clamped to what a pty takes
        (MADE_UP_TERM, (100, 30), "30 100"),
        ("vt100", (0, 0), "24 80"),  # 0x0 (unknown) becomes the classic 80x24
    ],
    ids=["xterm-256color", "dumb-oversized", "made-up-60", "vt100-0x0"],
)
async def test_pty_shell_with_odd_terminal_types(
    honeypot: Honeypot, term: str, size: tuple[int, int], stty: str
) -> None:
    hp = await honeypot()
    async with connect(hp) as conn:
        session = await session_of(hp, local_port(conn))
        proc = await conn.create_process(term_type=term, term_size=size, encoding=None)
        await read_until(proc.stdout, PROMPT)
        # $TERM and $(...) stay unexpanded in the pty's echo of the line, so only real output matches.
        proc.stdin.write(b'echo "T=$TERM=T"; echo "S=$(stty size)=S"; exit\n')
        async with asyncio.timeout(30):
            out = await proc.stdout.read()
            result = await proc.wait()
    text = out.decode("utf-8", "replace").replace("\r", "")
    assert f"T={term}=T\n" in text, text
    assert f"S={stty}=S\n" in text, text
    assert result.exit_status == 0
    cols, rows = (int(x) for x in reversed(stty.split()))
    (pty,) = of(hp, CHANNEL_PTY, session)
    assert (pty.get("term"), pty.get("width"), pty.get("height")) == (term, cols, rows)
    assert [(e.get("width"), e.get("height")) for e in of(hp, CLIENT_SIZE, session)] == [(cols, rows)]


async def test_pty_shell_exit_status_passes_back(honeypot: Honeypot) -> None:
    hp = await honeypot()
    async with connect(hp) as conn:
        proc = await conn.create_process(term_type="xterm", term_size=(80, 24), encoding=None)
        await read_until(proc.stdout, PROMPT)
        proc.stdin.write(b"exit 3\n")
        async with asyncio.timeout(30):
            await proc.stdout.read()
            result = await proc.wait()
    assert result.exit_status == 3


# -- env requests -------------------------------------------------------------------------------------
def hostile_env() -> dict[str, str]:
    """300 variables: the ones Debian's sshd accepts first, then names it refuses, then a flood."""
    env = {
        "LANG": "C.UTF-8",
        "LC_TIME": "en_DK.UTF-8",
        "LC_MY_OWN": "x y $(id) `id` {session}",
        "LC_TOO_LONG": "L" * 2000,  # accepted name, value too long for the box
        "LANGUAGE": "fr",
        "lc_all": "C",
        "LD_PRELOAD": "/tmp/evil.so",
        "BASH_ENV": "/tmp/evil.sh",
        "PATH": "/evil/bin",
        "HOME": "/tmp",
        "TERM": "evil-term",
    }
    binaryish = "".join(chr(c) for c in range(1, 32) if c != 10) + "\x7f\x1b[31m\u202e\U0001f600\ufffe"
    for i in range(300 - len(env)):
        env[f"X{i:03d}"] = binaryish + "v" * 4000 if i % 2 else f"{i}=" + "w" * 3000
    return env


async def test_huge_env_is_recorded_bounded_and_only_lang_and_lc_reach_the_box(honeypot: Honeypot) -> None:
    hp = await honeypot()
    sent = hostile_env()
    accepted = {"LANG", "LC_TIME", "LC_MY_OWN"}
    async with connect(hp) as conn:
        session = await session_of(hp, local_port(conn))
        r = await conn.run("env", env=sent, timeout=60)
        assert r.exit_status == 0, r.stderr
        box = dict(line.split("=", 1) for line in str(r.stdout).splitlines() if "=" in line)
        # The session survived the flood: the same connection still runs commands.
        again = await conn.run("uname -s", timeout=30)
        assert again.stdout == "Linux\n"
    assert {k for k in box if k in sent and box[k] == sent[k]} == accepted
    assert {k for k in box if k.startswith(("LC_", "LANG"))} == accepted
    assert box["LC_MY_OWN"] == sent["LC_MY_OWN"]  # passed as data, never expanded
    for refused in ("LD_PRELOAD", "BASH_ENV", "LANGUAGE", "lc_all", "X000", "X001", "TERM"):
        assert refused not in box, refused
    assert box["PATH"] == ROOT_PATH and box["HOME"] == "/root"
    # Every request up to ssh.max_env_vars is recorded (in order, values bounded), the rest are not.
    limit = hp.settings.ssh.max_env_vars
    recorded = of(hp, CLIENT_VAR, session)
    assert limit == 64 and len(recorded) == limit
    assert [e.get("name") for e in recorded] == list(sent)[:limit]
    for e in recorded:
        assert e.get("value") == sent[e.get("name")][:1024]
    assert recorded[-1].get("value") != sent[recorded[-1].get("name")]  # really truncated, not short


async def test_env_request_with_non_utf8_value_is_recorded(honeypot: Honeypot) -> None:
    hp = await honeypot()
    async with connect(hp) as conn:
        session = await session_of(hp, local_port(conn))
        r = await conn.run("true", env={b"LC_BINARY": b"\xff\xfe\x80payload", "LANG": "C"}, timeout=30)
        assert r.exit_status == 0
    names = [e.get("name") for e in of(hp, CLIENT_VAR, session)]
    assert "LANG" in names
    assert "LC_BINARY" in names


# -- exec -----------------------------------------------------------------------------------------------
async def test_exec_uname_reports_linux_and_is_recorded(honeypot: Honeypot) -> None:
    hp = await honeypot()
    async with connect(hp) as conn:
        session = await session_of(hp, local_port(conn))
        r = await conn.run("uname -a", timeout=30)
    assert r.exit_status == 0 and r.stderr == ""
    fields = str(r.stdout).split()
    assert fields[0] == "Linux"
    assert fields[1] == hp.settings.sandbox.hostname
    assert fields[-1] == "GNU/Linux"
    assert [e.get("input") for e in of(hp, COMMAND_INPUT, session)] == ["uname -a"]


# -- password auth: accept_all_after and max_auth_tries --------------------------------------------------
@pytest.mark.parametrize("n", [1, 3])
async def test_accept_all_after_n_failures_within_one_connection(honeypot: Honeypot, n: int) -> None:
    hp = await honeypot(auth={"accept_all_after": n})
    client = Passwords([f"wrong-{i}" for i in range(n)] + ["anything-at-all", "never-asked"])
    conn = await connect_with(hp, client)
    try:
        r = await conn.run("id -un", timeout=30)
        assert r.stdout == "root\n"
    finally:
        conn.close()
        await conn.wait_closed()
    assert client.offered == [*(f"wrong-{i}" for i in range(n)), "anything-at-all"]
    session = await session_of(hp, client.port)
    failed = of(hp, LOGIN_FAILED, session)
    assert [(e.get("password"), e.get("method"), e.get("reason")) for e in failed] == [
        (f"wrong-{i}", "password", "denied") for i in range(n)
    ]
    (ok,) = of(hp, LOGIN_SUCCESS, session)
    assert (ok.get("username"), ok.get("password"), ok.get("reason")) == ("root", "anything-at-all", "accept_all_after")


async def test_accept_all_after_zero_never_lets_a_wrong_password_in(honeypot: Honeypot) -> None:
    hp = await honeypot(auth={"accept_all_after": 0})
    client = Passwords([f"wrong-{i}" for i in range(5)])
    with pytest.raises(asyncssh.PermissionDenied):
        await connect_with(hp, client)
    assert len(client.offered) == 5
    session = await session_of(hp, client.port)
    await hp.wait_for(SESSION_CLOSED, session=session)
    assert len(of(hp, LOGIN_FAILED, session, reason="denied")) == 5
    assert of(hp, LOGIN_SUCCESS, session) == []
    assert of(hp, AUTH_TOO_MANY, session) == []


@pytest.mark.parametrize("max_tries", [None, 2])
async def test_max_auth_tries_disconnects_with_openssh_message(honeypot: Honeypot, max_tries: int | None) -> None:
    hp = await honeypot(ssh={"max_auth_tries": max_tries} if max_tries else {})
    limit = hp.settings.ssh.max_auth_tries
    assert limit == (max_tries or 6)
    client = Passwords([f"wrong-{i}" for i in range(limit + 4)])
    with pytest.raises(asyncssh.DisconnectError) as err:
        await connect_with(hp, client)
    assert err.value.reason == "Too many authentication failures"
    assert err.value.code == asyncssh.DISC_PROTOCOL_ERROR
    assert client.offered == [f"wrong-{i}" for i in range(limit)]  # no attempt after the limit
    session = await session_of(hp, client.port)
    (too_many,) = await hp.wait_for(AUTH_TOO_MANY, session=session)
    assert (too_many.get("username"), too_many.get("attempts")) == ("root", limit)
    assert len(of(hp, LOGIN_FAILED, session)) == limit
    (closed,) = await hp.wait_for(SESSION_CLOSED, session=session)
    assert closed.get("reason") == "max_auth_tries"


# -- keyboard-interactive --------------------------------------------------------------------------------
async def test_keyboard_interactive_login(honeypot: Honeypot) -> None:
    hp = await honeypot(auth={"keyboard_interactive": True})
    client = KbdInt(["not-it", "hunter2"])
    conn = await connect_with(hp, client, preferred_auth="keyboard-interactive")
    try:
        r = await conn.run("echo kbd-ok", timeout=30)
        assert r.stdout == "kbd-ok\n"
    finally:
        conn.close()
        await conn.wait_closed()
    assert client.prompts == [[("Password: ", False)], [("Password: ", False)]]  # echo off, like sshd's PAM
    session = await session_of(hp, client.port)
    (failed,) = of(hp, LOGIN_FAILED, session)
    assert (failed.get("method"), failed.get("password")) == ("keyboard-interactive", "not-it")
    (ok,) = of(hp, LOGIN_SUCCESS, session)
    assert (ok.get("method"), ok.get("username"), ok.get("password"), ok.get("reason")) == (
        "keyboard-interactive",
        "root",
        "hunter2",
        "credential",
    )


# -- public keys -----------------------------------------------------------------------------------------
def md5_fingerprint(blob: bytes) -> str:
    """OpenSSH's legacy fingerprint: md5 of the public key blob, colon-separated hex."""
    digest = hashlib.md5(blob, usedforsecurity=False).hexdigest()
    return ":".join(digest[i : i + 2] for i in range(0, 32, 2))


async def test_public_key_is_recorded_and_rejected_by_default(honeypot: Honeypot) -> None:
    hp = await honeypot()
    key = asyncssh.generate_private_key("ssh-ed25519")
    blob = key.public_data
    # Offered first, refused, then the password gets in.
    async with connect(hp, client_keys=[key], preferred_auth="publickey,password") as conn:
        session = await session_of(hp, local_port(conn))
        r = await conn.run("true", timeout=30)
        assert r.exit_status == 0
    (fp,) = of(hp, CLIENT_FINGERPRINT, session)
    assert fp.get("type") == "ssh-ed25519"
    assert fp.get("fingerprint") == md5_fingerprint(blob)
    assert fp.get("username") == "root"
    assert fp.get("key") == "ssh-ed25519 " + base64.b64encode(blob).decode()
    assert fp.get("fingerprint_sha256") == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip(
        "="
    )
    (refused,) = of(hp, LOGIN_FAILED, session)
    assert (refused.get("method"), refused.get("fingerprint")) == ("publickey", md5_fingerprint(blob))
    (ok,) = of(hp, LOGIN_SUCCESS, session)
    assert ok.get("method") == "password"
    # The key alone does not get in.
    with pytest.raises(asyncssh.PermissionDenied):
        async with connect(hp, client_keys=[key], password=None, preferred_auth="publickey"):
            pass


async def test_accepted_public_key_is_one_login(honeypot: Honeypot) -> None:
    hp = await honeypot(auth={"accept_publickey": True})
    key = asyncssh.generate_private_key("ssh-ed25519")
    async with connect(hp, client_keys=[key], password=None, preferred_auth="publickey") as conn:
        session = await session_of(hp, local_port(conn))
        r = await conn.run("id -un", timeout=30)
        assert r.stdout == "root\n"
    assert [e.get("method") for e in of(hp, LOGIN_SUCCESS, session)] == ["publickey"]
    assert len(of(hp, CLIENT_FINGERPRINT, session)) == 1


class ForeignKey(SSHLocalKeyPair):
    """An attacker holding only someone's public key: offers it, signs with a key of their own."""

    def __init__(self, public: asyncssh.SSHKey, signer: asyncssh.SSHKey) -> None:
        super().__init__(public, None, None, None)
        self._signer = signer

    def sign(self, data: bytes) -> bytes:
        return self._signer.sign(data, self.sig_algorithm)


async def test_public_key_with_a_bad_signature_is_not_a_login(honeypot: Honeypot) -> None:
    hp = await honeypot(auth={"accept_publickey": True})
    victim = asyncssh.generate_private_key("ssh-ed25519")
    attacker = asyncssh.generate_private_key("ssh-ed25519")
    client = Passwords([])
    with pytest.raises(asyncssh.PermissionDenied):
        await connect_with(hp, client, client_keys=[ForeignKey(victim, attacker)], preferred_auth="publickey")
    session = await session_of(hp, client.port)
    await hp.wait_for(SESSION_CLOSED, session=session)
    assert of(hp, CLIENT_FINGERPRINT, session)[0].get("fingerprint") == md5_fingerprint(victim.public_data)
    assert of(hp, LOGIN_SUCCESS, session) == []
    assert of(hp, SANDBOX_ASSIGNED, session) == []


# -- what is recorded about the client ---------------------------------------------------------------------
KEX = ["curve25519-sha256", "ecdh-sha2-nistp256", "diffie-hellman-group14-sha256"]
ENC = ["aes256-ctr", "aes128-gcm@openssh.com", "chacha20-poly1305@openssh.com"]
MAC = ["hmac-sha2-256", "hmac-sha1", "umac-128-etm@openssh.com"]
COMP = ["zlib@openssh.com", "none"]
# asyncssh appends these to the client's kex list itself (connection.py, _get_extra_kex_algs).
ASYNCSSH_KEX_EXTRAS = ["ext-info-c", "kex-strict-c-v00@openssh.com"]


async def test_client_version_and_hassh_of_the_clients_own_lists(honeypot: Honeypot) -> None:
    hp = await honeypot()
    async with connect(hp, kex_algs=KEX, encryption_algs=ENC, mac_algs=MAC, compression_algs=COMP) as conn:
        session = await session_of(hp, local_port(conn))
        await conn.run("true", timeout=30)
    expected = ";".join(",".join(x) for x in (KEX + ASYNCSSH_KEX_EXTRAS, ENC, MAC, COMP))
    (kex,) = of(hp, CLIENT_KEX, session)
    assert kex.get("hasshAlgorithms") == expected
    assert kex.get("hassh") == hashlib.md5(expected.encode(), usedforsecurity=False).hexdigest()
    assert (kex.get("kexAlgs"), kex.get("encCS"), kex.get("macCS"), kex.get("compCS")) == (
        KEX + ASYNCSSH_KEX_EXTRAS,
        ENC,
        MAC,
        COMP,
    )
    (version,) = of(hp, CLIENT_VERSION, session)
    assert version.get("version") == f"SSH-2.0-AsyncSSH_{asyncssh.__version__}"


async def test_client_version_is_the_clients_own_string_even_without_a_login(honeypot: Honeypot) -> None:
    hp = await honeypot()
    mine = f"Scanner_{secrets.token_hex(3)} {{session}} %s"
    client = Passwords([])  # tries "none", has no password: never gets in
    with pytest.raises(asyncssh.PermissionDenied):
        await connect_with(hp, client, client_version=mine)
    session = await session_of(hp, client.port)
    (version,) = await hp.wait_for(CLIENT_VERSION, session=session)
    assert version.get("version") == f"SSH-2.0-{mine}"
    assert version.message == f"Remote SSH version: SSH-2.0-{mine}"
    (kex,) = of(hp, CLIENT_KEX, session)
    assert "ext-info-c" in kex.get("kexAlgs")


# -- how a session ends ------------------------------------------------------------------------------------
async def test_session_closed_carries_duration_and_reason(honeypot: Honeypot) -> None:
    hp = await honeypot()
    started = time.monotonic()
    async with connect(hp) as conn:
        session = await session_of(hp, local_port(conn))
        await conn.run("sleep 1", timeout=30)
    (closed,) = await hp.wait_for(SESSION_CLOSED, session=session)
    elapsed = time.monotonic() - started
    assert closed.get("reason") == "client_closed"
    duration = float(closed.get("duration"))
    assert 1.0 <= duration <= elapsed + 0.1, (duration, elapsed)
    assert closed.get("duration") == f"{duration:.1f}"
    assert abs(closed.get("duration_ms") / 1000 - duration) <= 0.051
    assert closed.message == f"Connection lost after {closed.get('duration')} seconds"


async def test_exit_status_and_exit_signal_pass_back(honeypot: Honeypot) -> None:
    hp = await honeypot()
    async with connect(hp) as conn:
        session = await session_of(hp, local_port(conn))
        results = {cmd: await conn.run(cmd, timeout=30) for cmd in ("exit 0", "exit 7", "exit 255")}
        killed = await conn.run("kill -9 $$", timeout=30)
        termed = await conn.run("kill -TERM $$", timeout=30)
    assert {cmd: r.exit_status for cmd, r in results.items()} == {"exit 0": 0, "exit 7": 7, "exit 255": 255}
    assert all(r.exit_signal is None for r in results.values())
    assert killed.exit_signal is not None and killed.exit_signal[0] == "KILL"
    assert killed.returncode == -9
    assert termed.exit_signal is not None and termed.exit_signal[0] == "TERM"
    assert termed.returncode == -15
    exits = [(e.get("exit_status"), e.get("signal")) for e in of(hp, CHANNEL_EXIT, session)]
    assert exits == [(0, None), (7, None), (255, None), (137, "KILL"), (143, "TERM")]


async def test_eof_both_ways(honeypot: Honeypot) -> None:
    hp = await honeypot()
    # More than the relay's high-water mark, so the window closes and reopens on the way in.
    data = b"".join(b"%06d %s\n" % (i, secrets.token_hex(24).encode()) for i in range(6000))
    assert len(data) > 256 * 1024
    async with connect(hp) as conn:
        # Client -> box: cat echoes stdin until our EOF, then exits 0.
        r = await conn.run("cat", input=data, encoding=None, timeout=60)
        assert r.exit_status == 0
        assert r.stdout == data
        # EOF before any data (and before the box is even running the process).
        cat = await conn.create_process("cat", encoding=None)
        cat.stdin.write_eof()
        empty = await cat.wait(timeout=30)
        assert (empty.exit_status, empty.stdout) == (0, b"")
        # Box -> client: the process ends and we see EOF while our stdin is still open.
        proc = await conn.create_process("printf done; exit 4")
        async with asyncio.timeout(30):
            out = await proc.stdout.read()
            result = await proc.wait()
        assert out == "done"
        assert result.exit_status == 4


async def _sessions_at_once(conn: asyncssh.SSHClientConnection, n: int) -> list[str]:
    """``n`` session channels opened at once on ``conn``, each held by a command; what each got."""

    async def one(i: int) -> str:
        try:
            result = await conn.run(f"sleep 2; echo s{i}", timeout=60)
        except asyncssh.ChannelOpenError as exc:
            return f"refused {exc.code} {exc.reason}"
        return "ok" if result.stdout == f"s{i}\n" else f"odd {result!r}"

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def test_session_channels_past_max_sessions_are_refused_as_real_sshd_refuses_them(
    honeypot: Honeypot, tmp_path: Any
) -> None:
    """OpenSSH's MaxSessions (10): the 11th and 12th session channels open at once fail, as sshd's do; the
    connection goes on, and a channel opened after the others closed works."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    (tmp_path / "authorized_keys").write_text(key.export_public_key().decode())
    (tmp_path / "authorized_keys").chmod(0o600)
    async with real_sshd(
        tmp_path / "sshd", f"AuthorizedKeysFile {tmp_path / 'authorized_keys'}\nStrictModes no"
    ) as sshd:
        real_opts = {**options(), "username": "root", "password": None, "client_keys": [key]}
        real_opts["preferred_auth"] = "publickey"
        async with asyncssh.connect("127.0.0.1", sshd.port, **real_opts) as conn:
            real = await _sessions_at_once(conn, 12)
    hp = await honeypot()
    async with connect(hp) as conn:
        ours = await _sessions_at_once(conn, 12)
        again = await conn.run("echo again", timeout=60)
    assert sorted(ours) == sorted(real), (ours, real)
    assert ours.count("ok") == 10 and again.stdout == "again\n", ours
    closed = await hp.wait_for(SESSION_CLOSED)
    assert closed[0].get("reason") == "client_closed", closed[0]
