"""One session channel's process in the box: what the client asked for (pty, env, shell, exec or a subsystem),
started as the login's own, relayed with back-pressure, recorded (cast, commands, transfers), and ended with its
exit status.

The front end's channel callbacks feed it (:meth:`Channel.feed`, :meth:`Channel.feed_eof`, :meth:`Channel.resize`)
and give it a :class:`Port` to write to; nothing here knows SSH's types.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import posixpath
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from sandtrap.bridge import terminal_login
from sandtrap.bridge.commands import CommandReconstructor
from sandtrap.bridge.connection import Connection
from sandtrap.bridge.live import LiveTap
from sandtrap.bridge.login import (
    Peer,
    accepted_env,
    exec_argv,
    is_loopback,
    login_env,
    sftp_argv,
    shell_argv,
    terminal_login_argv,
)
from sandtrap.bridge.proxy import HIGH_WATER, ChannelPort, Relay, RelayObserver
from sandtrap.bridge.recorder import CastRecorder
from sandtrap.bridge.transfers import ScpWatcher, SftpWatcher, is_scp_sink
from sandtrap.errors import SandboxError
from sandtrap.events import (
    CHANNEL_CLOSED,
    CHANNEL_EXEC,
    CHANNEL_EXIT,
    CHANNEL_OPEN,
    CHANNEL_PTY,
    CHANNEL_SHELL,
    CHANNEL_SIGNAL,
    CHANNEL_SUBSYSTEM,
    CLIENT_SIZE,
    CLIENT_VAR,
    COMMAND_INPUT,
    LOG_CLOSED,
    LOG_OPEN,
    SCP_FILE,
    SESSION_FILE_UPLOAD,
    SFTP_REQUEST,
)
from sandtrap.logs import session_context
from sandtrap.sandbox.base import SSH_PORT, TELNET_PORT, ClientAddress, ExitStatus, Login, Process, Signals, TermSize

log = logging.getLogger(__name__)

MAX_COMMAND = 64 * 1024
SUBSYSTEMS = {"sftp"}

Kind = Literal["", "shell", "exec", "subsystem", "login"]  # login: a terminal login (telnet), login(1) in the box


class Port(ChannelPort, Protocol):
    """The front end's channel as the bridge sees it: the relay's port, plus how the channel ends."""

    def exit(self, status: ExitStatus) -> None:
        """Send the exit status (or signal) and close the channel."""

    def close(self) -> None:
        """Close the channel without an exit status (a failure of ours)."""


def clamp(cols: int, rows: int) -> TermSize:
    """Window sizes as a kernel pty takes them; 0 (unknown) becomes the classic 80x24."""
    return TermSize(min(max(cols, 1), 1000) if cols else 80, min(max(rows, 1), 1000) if rows else 24)


class Channel:
    """A session channel of one :class:`Connection`, numbered in the order the client opened them."""

    def __init__(self, conn: Connection, number: int, advertised_port: int = 22) -> None:
        self._conn = conn
        self.number = number
        self._advertised_port = advertised_port
        self._term: str | None = None
        self._size: TermSize | None = None
        self._kind: Kind = ""
        self._command = ""  # the command line as the box runs it
        self._raw_command: bytes | None = None  # exactly what the client sent, when it is not UTF-8
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._pending_eof = False
        self._relay: Relay | None = None
        self._process: Process | None = None
        self._takes_signals = False  # the box's own sshd runs the process (Features.own_sshd): signals go to it
        self.observers: list[RelayObserver] = []
        self._transfers = False
        self._cast: CastRecorder | None = None
        self._live: LiveTap | None = None

    def _emit(self, eventid: str, **fields: object) -> object:
        return self._conn.emitter.emit(eventid, **fields)

    # -- requests ---------------------------------------------------------------------------------
    def opened(self) -> None:
        self._emit(CHANNEL_OPEN, channel=self.number)

    def pty(self, term: str, cols: int, rows: int) -> None:
        self._term = term[:64] or "vt100"
        self._size = clamp(cols, rows)
        self._emit(CHANNEL_PTY, channel=self.number, term=self._term, width=self._size.cols, height=self._size.rows)
        self._emit(CLIENT_SIZE, width=self._size.cols, height=self._size.rows)

    def shell(self) -> None:
        self._kind = "shell"
        self._emit(CHANNEL_SHELL, channel=self.number)

    def terminal_login(self) -> None:
        """A terminal login the front end has authenticated (telnet): login(1) in the box, as telnetd starts it."""
        self._kind = "login"
        self._emit(CHANNEL_SHELL, channel=self.number)

    def exec(self, raw: bytes) -> None:
        """A command, as bytes: sshd hands it to execve, so it ends at the first NUL."""
        self._kind = "exec"
        raw = raw.split(b"\0", 1)[0]
        fields: dict[str, object] = {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Not UTF-8. The record keeps a string, with each invalid byte as a \xNN escape, and the exact bytes
            # in base64; a backend that carries bytes runs them exactly, one that carries text with U+FFFD.
            fields = {"utf8": False, "input_b64": base64.b64encode(raw[:MAX_COMMAND]).decode("ascii")}
            text = raw.decode("utf-8", "backslashreplace")
            self._command = raw.decode("utf-8", "replace")[:MAX_COMMAND]
            self._raw_command = raw[:MAX_COMMAND]
        else:
            self._command = text[:MAX_COMMAND]
        recorded = text[:MAX_COMMAND]
        self._emit(CHANNEL_EXEC, channel=self.number, input=recorded, **fields)
        self._emit(COMMAND_INPUT, input=recorded, channel=self.number, source="exec", **fields)

    def subsystem(self, name: str) -> bool:
        self._emit(CHANNEL_SUBSYSTEM, channel=self.number, subsystem=name[:64])
        if name not in SUBSYSTEMS:
            return False
        self._kind = "subsystem"
        self._command = name
        return True

    def client_env(self, pairs: Mapping[bytes, bytes], limit: int) -> dict[str, str]:
        """The client's environment requests, recorded (at most ``limit`` of them)."""
        env: dict[str, str] = {}
        for key, value in list(pairs.items())[:limit]:
            k = key.decode("utf-8", "replace")
            v = value.decode("utf-8", "replace")
            self._emit(CLIENT_VAR, name=k[:256], value=v[:1024], channel=self.number)
            env[k] = v
        return env

    # -- data from the client ---------------------------------------------------------------------
    def feed(self, data: bytes, port: ChannelPort) -> None:
        if self._relay is not None:
            self._relay.feed(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER:
            port.pause_reading()

    def feed_eof(self) -> None:
        if self._relay is not None:
            self._relay.feed_eof()
        else:
            self._pending_eof = True

    def resize(self, cols: int, rows: int) -> None:
        self._size = clamp(cols, rows)
        self._emit(CLIENT_SIZE, width=self._size.cols, height=self._size.rows, channel=self.number)
        if self._relay is not None:
            asyncio.get_running_loop().create_task(self._relay.resize(self._size))

    def set_writable(self, writable: bool) -> None:
        if self._relay is not None:
            self._relay.set_writable(writable)

    # -- the process in the box -------------------------------------------------------------------
    async def run(self, port: Port, env: dict[str, str]) -> None:
        """Start the process, relay until it ends, pass its exit status on. ``env``: the client's variables."""
        c = self._conn
        session_context.set(f"{c.session} {c.src_ip}")
        try:
            lease = await c.lease()
            password = c.password or ""
            # telnet: login checks the password itself (its prompts answered), so the box has it first
            answered = self._kind == "login" and terminal_login.answerable(c.username, password)
            account = await c.hub.manager.account(lease, c.username, c.password, wait_password=answered)
            # The server address a login sees (SSH_CONNECTION, `ss` in the box) is one of the box's own, as a
            # server behind NAT shows its private address: the box's eth0 for a client off loopback.
            server_ip = c.dst_ip
            if not is_loopback(c.src_ip):
                server_ip = await lease.sandbox.network_address() or c.dst_ip
            peer = Peer(c.src_ip, c.src_port, server_ip, c.dst_port)
            # One login per connection, as sshd has: the first shell or exec channel's helper logs it (the
            # failed passwords, "Accepted", the PAM session); the connection's end logs its close once.
            first = self._kind != "subsystem" and c.login_id is None
            if first:
                c.login_id = lease.logins.new_id()
                c.login_account = account
            method = c.auth_method if first else None
            failures = list(c.failed_logins) if first else []
            login_vars = login_env(account, peer, env, self._term, self._advertised_port, c.login_id)
            tty = self._size if self._term is not None else None
            user = "root"  # the session helper runs as root and drops to the account itself
            scope = lease.sandbox.features.login_scopes and c.login_id is not None and self._kind != "login"
            if self._kind == "login":
                # login: the PAM session, utmp/wtmp/lastlog, motd, "Last login", the login shell, as after
                # telnetd's login (no sshd helper: no "Accepted" line, no SSH_* variables).
                argv = terminal_login_argv(account, peer.src_ip, self._term, env, answered)
                self.observers.append(CommandReconstructor(self._command_typed))
            elif self._kind == "shell":
                argv = shell_argv(account, login_vars, peer, method, failures, scope)
                # Keystrokes become command lines (PTY or not: bots pipe commands into a shell).
                self.observers.append(CommandReconstructor(self._command_typed))
            elif self._kind == "exec":
                # Not UTF-8: the exact bytes, which a backend that can carry them runs as the client sent them.
                command = self._raw_command if self._raw_command is not None else self._command
                argv = exec_argv(account, login_vars, peer, method, command, failures, scope)
                if is_scp_sink(self._command):
                    self._transfers = True
                    self.observers.append(ScpWatcher(self._scp_report(account.home)))
            else:
                argv = sftp_argv(login_vars)
                user = account.name
                self._transfers = True
                self.observers.append(SftpWatcher(self._sftp_report(account.home)))
            # The connection's login shows its TCP connection in the box, as sshd's does (sandbox.connection_in_box),
            # and its processes go where pam_systemd puts a login's (the helper waits for that).
            login = Login(
                uid=account.uid,
                session_id=c.login_id if scope else None,
                # a telnet login's connection shows on :23, held by telnetd under inetd
                client=ClientAddress(
                    c.src_ip, c.src_port, server_ip, TELNET_PORT if self._kind == "login" else SSH_PORT
                )
                if first
                else None,
                failed=tuple((f.username, f.method) for f in failures),
                **self._asked(env),
            )
            self._process = await lease.sandbox.exec(argv, tty=tty, user=user, workdir=account.home, login=login)
            self._takes_signals = lease.sandbox.features.own_sshd
            if answered:  # login's own prompts, answered; else (they did not come) login -f, as before
                ask_user = env.get("USER") != account.name  # else login has the name (terminal_login_argv)
                done = await terminal_login.answer(self._process, account.name, password, ask_user)
                if done is None:
                    log.warning("telnet login: login's prompts did not come; starting login -f")
                    await self._process.kill()
                    argv = terminal_login_argv(account, peer.src_ip, self._term, env)
                    self._process = await lease.sandbox.exec(
                        argv, tty=tty, user=user, workdir=account.home, login=login
                    )
                else:
                    self._process = done
            if self._kind != "subsystem":  # no cast of the binary SFTP protocol (its requests are events)
                self._open_cast(account.shell)
            if self._kind in ("shell", "login"):  # the interactive terminal can be watched live, read-only
                self._live = LiveTap(c.hub.live, c.session, self._size or TermSize(80, 24))
                self.observers.append(self._live)
            relay = Relay(self._process, port, c.usage, self.observers)
            self._relay = relay
            while self._pending:
                relay.feed(self._pending.popleft())
            if self._pending_bytes > HIGH_WATER:
                port.resume_reading()
            if self._pending_eof:
                relay.feed_eof()
            status = await relay.run()
            self._emit(CHANNEL_EXIT, channel=self.number, exit_status=status.code, signal=status.signal)
            port.exit(status)
        except asyncio.CancelledError:
            raise
        except SandboxError as exc:
            log.warning("channel %d: sandbox failed: %s", self.number, exc)
            # What a client sees when sshd cannot start the session: the connection goes away.
            c.end("sandbox_error", str(exc)[:200], limit=False)
        except Exception:
            log.exception("channel %d failed", self.number)
            port.close()
        finally:
            if self._process is not None:
                with contextlib.suppress(Exception):
                    await self._process.kill()
            self._close_cast()
            if self._live is not None:
                self._live.close()
            if self._transfers and self._relay is not None:
                # The transfer is over: keep a copy of every uploaded file, in a task the channel's
                # close cannot cancel (the connection's closing record waits for it).
                c.track(self._collect_uploads())
            self._emit(CHANNEL_CLOSED, channel=self.number, bytes_in=c.usage.bytes_in, bytes_out=c.usage.bytes_out)

    def _asked(self, env: Mapping[str, str]) -> dict[str, Any]:
        """What the client asked sshd for on this channel (Login's fields for a backend with its own sshd)."""
        c = self._conn
        if self._kind == "exec":
            command: bytes | None = self._raw_command or self._command.encode("utf-8", "surrogateescape")
        elif self._kind == "subsystem":
            command = self._command.encode()
        else:
            command = None
        return {
            "session": c.session,
            "peer": ClientAddress(c.src_ip, c.src_port, c.dst_ip),
            "username": c.username,
            "password": c.password,
            "auth_method": c.auth_method,
            "kind": self._kind if self._kind != "login" else "",
            "command": command,
            "term": self._term,
            "env": tuple(accepted_env(env).items()),
        }

    def signal(self, name: str) -> None:
        """The client's ``signal`` request: delivered where the process takes signals (the box's own sshd)."""
        self._emit(CHANNEL_SIGNAL, channel=self.number, signal=name[:32])
        process = self._process
        if process is not None and self._takes_signals and isinstance(process, Signals):
            asyncio.get_running_loop().create_task(process.signal(name[:32]))

    def _command_typed(self, line: str) -> None:
        self._emit(COMMAND_INPUT, input=line, channel=self.number, source="tty")

    def _open_cast(self, shell: str) -> None:
        c = self._conn
        rec = c.hub.recording
        if not rec.casts:
            return
        size = self._size if self._term is not None else None
        ttylog = Path("casts") / c.session / f"{self.number}.cast"
        self._cast = CastRecorder(
            c.hub.data_dir / ttylog,
            width=size.cols if size else 80,
            height=size.rows if size else 24,
            term=self._term or "",
            shell=shell,
            title=f"{c.session} from {c.src_ip} (channel {self.number})",
            flush_interval_s=rec.cast_flush_interval_s,
            max_bytes=rec.max_cast_bytes,
            health=c.hub.health,
        )
        self.observers.append(self._cast)
        self._emit(LOG_OPEN, ttylog=str(ttylog), channel=self.number)

    def _close_cast(self) -> None:
        cast, self._cast = self._cast, None
        if cast is None:
            return
        path, size, sha, duration = cast.close()
        self._emit(
            LOG_CLOSED,
            ttylog=str(path.relative_to(self._conn.hub.data_dir)),
            channel=self.number,
            size=size,
            shasum=sha,
            duration=f"{duration:.1f}",
            duration_ms=int(duration * 1000),
            duplicate=False,  # Cowrie's field: each cast has a path of its own, never a duplicate
        )

    async def _collect_uploads(self) -> None:
        lease = await self._conn.lease()

        def report(**fields: object) -> object:
            return self._emit(SESSION_FILE_UPLOAD, channel=self.number, **fields)

        await self._conn.artifacts.collect_uploads(lease.sandbox, report)

    def _sftp_report(self, cwd: str) -> Callable[..., object]:
        def report(**fields: object) -> object:
            if fields.get("op") == "open" and "write" in str(fields.get("flags", "")):
                self._conn.artifacts.note_upload(str(fields["path"]), "sftp", cwd)
            return self._emit(SFTP_REQUEST, channel=self.number, **fields)

        return report

    def _scp_report(self, cwd: str) -> Callable[..., object]:
        # "scp -t TARGET": TARGET is a directory (file goes inside) or the file itself.
        words = self._command.split()
        target = next((w for w in reversed(words[1:]) if not w.startswith("-")), ".")

        def report(**fields: object) -> object:
            if fields.get("kind") == "file":
                name = str(fields["filename"])
                self._conn.artifacts.note_upload(posixpath.join(target, name), "scp", cwd)
                self._conn.artifacts.note_upload(target, "scp", cwd)
            return self._emit(SCP_FILE, channel=self.number, **fields)

        return report
