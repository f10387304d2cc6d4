"""The attacker's SSH session served by the guest's own sshd (``Features.own_sshd``).

Per attacker connection one SSH client connection to the guest's sshd, made inside the VM's network namespace
from the attacker's own address and port, logged in as the attacker did; then one channel per attacker channel
(pty, env, shell, exec, subsystem). The guest's sshd then logs, counts and shows the login as it would any:
``Accepted password for USER from IP port PORT ssh2``, utmp/wtmp/lastlog, the PAM session, ``ss``.

Where the attacker's address cannot appear on the guest's network it is mapped to the host side of the VM's tap
(the guest's gateway): a client on loopback or IPv6 (the guest has IPv4 only), or one with the guest's own address.
Any other address is added to the namespace's ``lo`` (the namespace holds only this VM: nothing else sees it) and
the socket bound to it and to the attacker's source port (another port if that one is taken).

The attacker's refused passwords on that connection are asked first, on the same connection, with wrong passwords
(the guest's sshd logs ``Failed password for USER from IP port PORT ssh2`` for each, then the login's ``Accepted``),
as many as sshd's MaxAuthTries leaves room for; each costs the guest's PAM its failure delay (about 2 s).

A publickey login cannot be repeated (the attacker's private key stays with the attacker): the relay logs in with
the sensor's access key, which root's ``authorized_keys`` holds from the image and which is added to another
account's ``~/.ssh/authorized_keys`` before its first such login. sshd then logs ``Accepted publickey`` with that
key's fingerprint. A password the guest cannot take (empty, or with a CR, LF or NUL) falls back to the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import ipaddress
import logging
import secrets
import socket
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

import asyncssh

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Login, TermSize
from sandtrap.sandbox.host import netns
from sandtrap.sandbox.microvm.guest import SSH_PORT, GuestProcess

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0
LOGIN_TIMEOUT_S = 60.0  # the guest's PAM under TCG takes seconds
CLOSE_TIMEOUT_S = 5.0
ADDRESS_DEV = "lo"

# Run by root in the guest with the account and the key line as arguments (never spliced into the script).
AUTHORIZE = r"""
u="$1"; k="$2"
h=$(getent passwd "$u" | cut -d: -f6) && [ -n "$h" ] && [ -d "$h" ] || exit 3
g=$(id -g "$u") || exit 3
install -d -m 0700 -o "$u" -g "$g" "$h/.ssh" || exit 4
f="$h/.ssh/authorized_keys"
grep -qxF -- "$k" "$f" 2>/dev/null || printf '%s\n' "$k" >> "$f" || exit 4
chown "$u:$g" "$f" && chmod 0600 "$f"
"""

Authorize = Callable[[str], Awaitable[None]]  # put the access key in this account's authorized_keys


def source_address(client_ip: str, guest_address: str) -> str | None:
    """The address the guest's sshd sees the attacker come from: the attacker's own, or None for the host side
    of the tap (a loopback, IPv6, non-unicast or unparsable address, or the guest's own)."""
    try:
        ip = ipaddress.ip_address(client_ip.removeprefix("::ffff:"))
    except ValueError:
        return None
    if not isinstance(ip, ipaddress.IPv4Address) or str(ip) == guest_address:
        return None
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local or ip.is_reserved:
        return None
    return str(ip)


def usable_password(password: str | None) -> bool:
    """Whether the guest has this password (ensure_account sets only one on a line of its own, not empty)."""
    return bool(password) and not any(c in password for c in "\r\n\0")  # type: ignore[operator]


MAX_REPLAYED = 5  # the guest's sshd closes a connection after MaxAuthTries (6) failures: room for the login


@dataclass(frozen=True)
class Attempt:
    """One way to log in to the guest's sshd as the attacker's account."""

    method: str  # "password" or "publickey"
    options: dict[str, Any]
    wrong: int = 0  # wrong passwords sent first (the attacker's refused ones, replayed)


def replayed(login: Login) -> int:
    """How many of the connection's refused attempts the guest's sshd is asked again: the password ones for this
    login's user (sshd allows no change of user on a connection), at most :data:`MAX_REPLAYED`."""
    return min(MAX_REPLAYED, sum(1 for user, method in login.failed if user == login.username and method == "password"))


class ReplayClient(asyncssh.SSHClient):
    """Answers sshd's password requests: ``wrong`` random passwords, then ``password`` (None: none, so the
    connection goes on to its next method)."""

    def __init__(self, wrong: int, password: str | None) -> None:
        wrong_ones: list[str | None] = [secrets.token_urlsafe(12) for _ in range(wrong)]
        self._answers = [*wrong_ones, password]

    def password_auth_requested(self) -> str | None:
        return self._answers.pop(0) if self._answers else None


def attempts(login: Login, key: asyncssh.SSHKey) -> list[Attempt]:
    """How to log in as the attacker did: their password where the guest has it, else the access key."""
    base: dict[str, Any] = {
        "username": login.username,
        "known_hosts": None,  # the namespace holds only this VM: nothing else can answer there
        "agent_path": None,
        "config": None,
        "keepalive_interval": 0,
        "login_timeout": LOGIN_TIMEOUT_S,
    }
    wrong = replayed(login)
    out = []
    if login.auth_method != "publickey" and usable_password(login.password):
        options = base | {"client_keys": None, "preferred_auth": "password"}
        out.append(Attempt("password", options, wrong))
        wrong = 0  # replayed once, on the first attempt's connection
    methods = "password,publickey" if wrong else "publickey"
    out.append(Attempt("publickey", base | {"client_keys": [key], "preferred_auth": methods}, wrong))
    return out


def client_factory(attempt: Attempt, login: Login) -> Callable[[], asyncssh.SSHClient]:
    password = login.password if attempt.method == "password" else None
    return lambda: ReplayClient(attempt.wrong, password)


def process_options(login: Login, tty: TermSize | None) -> dict[str, Any]:
    """The channel's requests as the attacker made them: pty (TERM, size), env, then shell, exec or subsystem."""
    options: dict[str, Any] = {"encoding": None, "env": dict(login.env)}
    if tty is not None:
        options.update(term_type=login.term or "xterm", term_size=(tty.cols, tty.rows))
    if login.kind == "exec":
        if login.command is None:
            raise SandboxError("exec login without a command")
        # asyncssh sends a bytes command as it is (its String() takes bytes); its type says str.
        options["command"] = cast(str, login.command)
    elif login.kind == "subsystem":
        if not login.command:
            raise SandboxError("subsystem login without a name")
        options["subsystem"] = login.command.decode("ascii", "replace")
    elif login.kind != "shell":
        raise SandboxError(f"not a login the guest's sshd serves: {login.kind!r}")
    return options


def _socket(source: str | None, port: int, guest: str) -> Callable[[], socket.socket]:
    """Run in the VM's namespace: the attacker's address on ``lo`` (once), a socket bound to it and the port."""

    def work() -> socket.socket:
        if source is not None:
            done = subprocess.run(
                ["ip", "-4", "addr", "replace", f"{source}/32", "dev", ADDRESS_DEV],
                capture_output=True,
                timeout=CONNECT_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                raise SandboxError(f"ip addr {source}: {done.stderr.decode(errors='replace').strip()}")
        for bind_port in (port, 0):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.settimeout(CONNECT_TIMEOUT_S)
                sock.bind((source or "", bind_port))
                sock.connect((guest, SSH_PORT))
            except OSError as exc:
                sock.close()
                if bind_port and exc.errno in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                    continue  # the attacker's port is taken here (a connection of theirs that just ended)
                raise
            sock.setblocking(False)
            return sock
        raise SandboxError("no source port")  # not reached: port 0 either connects or raises

    return work


class RelayProcess(GuestProcess):
    """A channel on the attacker's own connection to the guest's sshd. Ending it closes the channel, as a client
    that goes away does (sshd hangs up the session), rather than killing it."""

    async def kill(self) -> None:
        self._proc.close()
        for task in self._pumps:
            task.cancel()
        with contextlib.suppress(asyncssh.Error, OSError, asyncio.CancelledError):
            await asyncio.gather(*self._pumps, return_exceptions=True)


@dataclass
class _Held:
    lock: asyncio.Lock
    conn: asyncssh.SSHClientConnection | None = None


class GuestLogins:
    """The attacker connections of one VM, each relayed into its guest's sshd."""

    def __init__(
        self,
        pid: int,
        is_same_vm: Callable[[], bool],
        guest_address: str,
        key: asyncssh.SSHKey,
        name: str,
        authorize: Authorize,
    ) -> None:
        self._pid = pid
        self._is_same_vm = is_same_vm
        self._guest = guest_address
        self._key = key
        self._name = name
        self._authorize = authorize
        self._held: dict[str, _Held] = {}

    async def open(self, login: Login, tty: TermSize | None) -> RelayProcess:
        """A channel of the attacker's connection ``login.session`` (connected and logged in on first use)."""
        options = process_options(login, tty)
        conn = await self._connection(login)
        try:
            proc = await conn.create_process(**options)
        except (asyncssh.Error, OSError) as exc:
            raise SandboxError(f"{self._name}'s sshd refused the {login.kind} channel: {exc!r}") from exc
        return RelayProcess(cast("asyncssh.SSHClientProcess[bytes]", proc))

    async def _connection(self, login: Login) -> asyncssh.SSHClientConnection:
        if not login.session or login.peer is None or not login.username:
            raise SandboxError("a login for the guest's sshd needs its session, peer and user name")
        held = self._held.setdefault(login.session, _Held(asyncio.Lock()))
        async with held.lock:
            if held.conn is not None and held.conn.is_closed():
                held.conn = None  # the guest ended it (sshd killed in the guest): a new one, as a reconnect
            if held.conn is None:
                held.conn = await self._login(login)
            return held.conn

    async def _login(self, login: Login) -> asyncssh.SSHClientConnection:
        assert login.peer is not None
        source = source_address(login.peer.ip, self._guest)
        last: Exception | None = None
        for attempt in attempts(login, self._key):
            if attempt.method == "publickey" and login.username != "root":
                await self._authorize(login.username)
            try:
                sock = await netns.in_box_netns(
                    self._pid, self._is_same_vm, _socket(source, login.peer.port, self._guest),
                    f"{self._name}'s sshd", CONNECT_TIMEOUT_S + 5,
                )  # fmt: skip
            except (OSError, TimeoutError) as exc:
                raise SandboxError(f"cannot reach {self._name}'s sshd from {source or 'the tap'}: {exc}") from exc
            try:
                async with asyncio.timeout(LOGIN_TIMEOUT_S + 5):
                    conn = await asyncssh.connect(
                        sock=sock, client_factory=client_factory(attempt, login), **attempt.options
                    )
            except asyncssh.PermissionDenied as exc:
                sock.close()
                last = exc
                log.warning("%s: the guest's sshd refused %s's %s login", self._name, login.username, attempt.method)
                continue
            except (OSError, asyncssh.Error, TimeoutError) as exc:
                sock.close()
                raise SandboxError(f"SSH to {self._name}'s sshd as {login.username!r} failed: {exc!r}") from exc
            log.info(
                "%s: %s logged in to the guest's sshd by %s from %s:%d", self._name, login.username,
                attempt.method, source or "the tap's host side", login.peer.port,
            )  # fmt: skip
            return conn
        raise SandboxError(f"the guest's sshd let {login.username!r} in by no method: {last!r}")

    async def end(self, session: str) -> None:
        """Close the connection of ``session``; harmless when there is none."""
        held = self._held.pop(session, None)
        if held is None:
            return
        async with held.lock:
            conn, held.conn = held.conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), CLOSE_TIMEOUT_S)

    async def close(self) -> None:
        for session in list(self._held):
            await self.end(session)
