"""What sshd would run in the box: the account, the login environment, the argv per channel kind.

Everything here that came from the attacker (user name, password, command, client env) is passed as
an argv element or on stdin, never spliced into a shell string.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Login, Sandbox, run

SFTP_SERVER = "/usr/lib/openssh/sftp-server"
# Our helper in the image (sandbox/session.c): utmp/wtmp/lastlog, auth log, motd, "Last login", the
# user's shell as a login shell under a parent named "sshd: user@pts/N"; passes the exit status back.
SESSION_HELPER = "/usr/lib/openssh/sshd-session"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
USER_PATH = "/usr/local/bin:/usr/bin:/bin:/usr/games"
# Debian's sshd_config: "AcceptEnv LANG LC_*" (plus what OpenSSH itself always takes: TERM via the pty).
_ACCEPT_ENV = re.compile(r"LANG|LC_[A-Z_]+")
_MAX_ENV_VALUE = 1024

# Make sure the account exists (sshd would have found it in /etc/passwd) and carries the password
# the attacker logged in with, so `sudo` and `su` in the box agree with the login. Prints passwd line.
_ENSURE_ACCOUNT = r"""
u="$1"
# One account change at a time in a box (two logins at once would each rewrite /etc/shadow): the lock file
# shadow-utils itself uses, opened without writing to it.
exec 9>>/etc/.pwd.lock && flock -w 10 9 2>/dev/null
if ! getent passwd "$u" >/dev/null; then
  useradd -m -s /bin/bash "$u" >/dev/null 2>&1 || exit 3
fi
IFS= read -r pw || true
if [ -n "$pw" ]; then
  # Straight into /etc/shadow: chpasswd and usermod would each leave a line in the auth log.
  h=$(printf '%s' "$pw" | openssl passwd -6 -stdin 2>/dev/null) && [ -n "$h" ] &&
    awk -F: -v OFS=: -v u="$u" -v h="$h" '$1 == u { $2 = h } { print }' /etc/shadow > "/etc/shadow.$$" &&
    cat "/etc/shadow.$$" > /etc/shadow && rm -f "/etc/shadow.$$"
fi
getent passwd "$u"
"""


@dataclass(frozen=True, slots=True)
class Account:
    name: str
    uid: int
    home: str
    shell: str

    @property
    def path(self) -> str:
        return ROOT_PATH if self.uid == 0 else USER_PATH


@dataclass(frozen=True, slots=True)
class Peer:
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int


@dataclass(frozen=True, slots=True)
class FailedLogin:
    """A wrong password on this connection, before the one that got in: sshd logs each in auth.log."""

    time: float  # when it was refused (epoch seconds)
    username: str
    method: str  # as sshd names it: "password" or "keyboard-interactive/pam"


# The failures handed to the helper (bounded: they are argv elements); sshd's MaxAuthTries is 6.
MAX_FAILED_LOGGED = 20


async def ensure_account(sandbox: Sandbox, username: str, password: str | None) -> Account:
    """Create the user in the box if needed, set its password, and return its passwd entry."""
    stdin = b""
    if password and not any(c in password for c in "\r\n\0"):
        stdin = password.encode("utf-8", "surrogateescape") + b"\n"
    # As a login's process (the box's listener on Docker: ~2 ms to start, not docker exec's ~50): it runs between
    # the login and its shell, so it is on the path to the prompt.
    argv = ["sh", "-c", _ENSURE_ACCOUNT, "sh", username]
    result = await run(sandbox, argv, stdin, max_output=4096, login=Login(uid=0))
    status = result.status
    line = result.stdout.decode("utf-8", "replace").strip().splitlines()
    if status.code != 0 or not line:
        raise SandboxError(f"cannot set up account {username!r} in the sandbox (exit {status.code})")
    parts = line[-1].split(":")
    if len(parts) < 7:
        raise SandboxError(f"unexpected passwd entry for {username!r}")
    return Account(name=parts[0], uid=int(parts[2]), home=parts[5] or "/", shell=parts[6] or "/bin/sh")


async def read_passwd(sandbox: Sandbox) -> dict[str, Account]:
    """The box's /etc/passwd as accounts (read once while it is warm; a login needs no exec to find its own)."""
    try:
        info = await sandbox.get_file("/etc/passwd", 1 << 20)
    except SandboxError:
        return {}
    if info is None or info.data is None:
        return {}
    out = {}
    for line in info.data.decode("utf-8", "replace").splitlines():
        parts = line.split(":")
        if len(parts) >= 7 and parts[2].isdigit():
            out[parts[0]] = Account(name=parts[0], uid=int(parts[2]), home=parts[5] or "/", shell=parts[6] or "/bin/sh")
    return out


def accepted_env(client_env: Mapping[str, str]) -> dict[str, str]:
    """The client's env requests that Debian's sshd would accept (AcceptEnv LANG LC_*)."""
    out = {}
    for k, v in client_env.items():
        if _ACCEPT_ENV.fullmatch(k) and "\0" not in v and len(v) <= _MAX_ENV_VALUE:
            out[k] = v
    return out


def is_loopback(ip: str) -> bool:
    """Whether a client's address is on loopback (127.0.0.0/8, ::1); anything not an address is not."""
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return False


def login_env(
    account: Account,
    peer: Peer,
    client_env: Mapping[str, str],
    term: str | None,
    advertised_port: int,
    session_id: int | None = None,
) -> dict[str, str]:
    """The environment sshd gives a session, with no engine-added variables.

    With ``session_id`` (the connection's login session, one per connection as logind counts them),
    also what pam_systemd adds on Debian: sshd sessions are of type ``tty`` with or without a terminal.
    """
    env = {
        "USER": account.name,
        "LOGNAME": account.name,
        "HOME": account.home,
        "PATH": account.path,
        "SHELL": account.shell,
        # Debian's /etc/pam.d/sshd: pam_motd marks the motd shown; pam_mail has noenv (no MAIL), exec or not
        "MOTD_SHOWN": "pam",
        "SSH_CLIENT": f"{peer.src_ip} {peer.src_port} {advertised_port}",
        "SSH_CONNECTION": f"{peer.src_ip} {peer.src_port} {peer.dst_ip} {advertised_port}",
    }
    if session_id is not None:
        runtime = f"/run/user/{account.uid}"  # the session helper creates it (0700, the user's)
        env |= {
            "XDG_SESSION_ID": str(session_id),
            "XDG_SESSION_TYPE": "tty",
            "XDG_SESSION_CLASS": "user",
            "XDG_RUNTIME_DIR": runtime,
            "DBUS_SESSION_BUS_ADDRESS": f"unix:path={runtime}/bus",
        }
    if term:
        env["TERM"] = term
    env.update(accepted_env(client_env))
    return env


def _with_env(env: Mapping[str, str], argv: Sequence[str | bytes]) -> list[str | bytes]:
    # `env -i` drops what the engine adds to every exec (HOSTNAME, the image's own variables).
    return ["/usr/bin/env", "-i", *(f"{k}={v}" for k, v in env.items()), *argv]


def _helper(
    account: Account,
    peer: Peer,
    method: str | None,
    failures: Sequence[FailedLogin],
    command: str | bytes | None,
    scope: bool = False,
) -> list[str | bytes]:
    """``sshd-session [-s] [-f TIME:METHOD:USER]... -- USER IP PORT METHOD [COMMAND]`` (see session.c).

    ``method`` None: a later channel of a connection whose login the helper has logged already
    (METHOD ``-``: no second ``Accepted`` line). ``failures``: the wrong passwords tried before.
    ``scope``: the backend moves the helper into its session scope; it waits for that before forking.
    """
    argv: list[str | bytes] = [SESSION_HELPER, "-s"] if scope else [SESSION_HELPER]
    for f in failures[-MAX_FAILED_LOGGED:]:
        if "\0" not in f.username:
            argv += ["-f", f"{f.time:.6f}:{f.method}:{f.username}"]
    argv += ["--", account.name, peer.src_ip, str(peer.src_port), method or "-"]
    return argv if command is None else [*argv, command]


def shell_argv(
    account: Account,
    env: Mapping[str, str],
    peer: Peer,
    method: str | None,
    failures: Sequence[FailedLogin] = (),
    scope: bool = False,
) -> list[str | bytes]:
    """An interactive (or, without a pty, a plain) login shell, as sshd starts it."""
    return _with_env(env, _helper(account, peer, method, failures, None, scope))


def exec_argv(
    account: Account,
    env: Mapping[str, str],
    peer: Peer,
    method: str | None,
    command: str | bytes,
    failures: Sequence[FailedLogin] = (),
    scope: bool = False,
) -> list[str | bytes]:
    """``$SHELL -c COMMAND`` as the user, under an ``sshd: user@notty`` parent, as sshd runs it. ``command`` as
    bytes where it is not UTF-8: a backend that carries bytes runs exactly what the client sent."""
    return _with_env(env, _helper(account, peer, method, failures, command, scope))


def close_argv(account: Account, peer: Peer) -> list[str]:
    """The connection is over: the helper logs sshd's disconnect and ``session closed`` lines, once, under the
    pid that logged the connection's ``Accepted`` line."""
    return [SESSION_HELPER, "-x", "--", account.name, peer.src_ip, str(peer.src_port), "-"]


def terminal_login_argv(
    account: Account, host: str, term: str | None, client_env: Mapping[str, str], answered: bool = False
) -> list[str | bytes]:
    """``login -p -h HOST [USER]`` on the session's pty, as Debian's inetutils telnetd runs it (USER: the client's,
    by NEW-ENVIRON), its prompts ``answered`` by the honeypot (bridge/terminal_login.py); else ``login -p -h HOST
    -f USER``, which asks nothing. login sets up the PAM session, utmp/wtmp (with HOST), lastlog, the motd and the
    login shell. HOST as telnetd names the client (:func:`telnet_host`). Of the client's variables (telnet
    NEW-ENVIRON) only what ``login -p`` would keep of sshd's AcceptEnv."""
    env = {"TERM": term or "network"} | accepted_env(client_env)
    argv = ["/bin/login", "-p", "-h", telnet_host(host)]
    if not answered:
        argv += ["-f", account.name]
    elif client_env.get("USER") == account.name:
        argv.append(account.name)
    return _with_env(env, argv)


def telnet_host(ip: str) -> str:
    """The client's name as telnetd gives it to login and wtmp: the box's /etc/hosts names 127.0.0.1 and ::1
    ``localhost``; any other address it cannot resolve (no DNS in the box) stays an address."""
    return "localhost" if ip in ("127.0.0.1", "::1") else ip


def sftp_argv(env: Mapping[str, str]) -> list[str | bytes]:
    return _with_env(env, [SFTP_SERVER])
