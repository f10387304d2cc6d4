"""One SSH session channel: pty/env/shell/exec/subsystem requests, bridged to a process in the box."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import posixpath
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import asyncssh

from sandtrap.bridge.commands import CommandReconstructor
from sandtrap.bridge.live import LiveTap
from sandtrap.bridge.login import Peer, exec_argv, is_loopback, login_env, sftp_argv, shell_argv
from sandtrap.bridge.proxy import HIGH_WATER, Relay, RelayObserver
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
from sandtrap.sandbox.base import ClientAddress, Login, Process, TermSize
from sandtrap.ssh.wire import accept_any_exec_command

if TYPE_CHECKING:
    from sandtrap.ssh.server import ConnectionHandler

log = logging.getLogger(__name__)

MAX_COMMAND = 64 * 1024
_SUBSYSTEMS = {"sftp"}


class ChannelBridge(asyncssh.SSHServerSession[bytes]):
    def __init__(self, handler: ConnectionHandler, number: int) -> None:
        self._handler = handler
        self._number = number
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._term: str | None = None
        self._size: TermSize | None = None
        self._kind = ""
        self._command = ""
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._pending_eof = False
        self._relay: Relay | None = None
        self._task: asyncio.Task[None] | None = None
        self._process: Process | None = None
        self.observers: list[RelayObserver] = []
        self._transfers = False
        self._cast: CastRecorder | None = None
        self._live: LiveTap | None = None

    @property
    def _emit(self):  # type: ignore[no-untyped-def]
        assert self._handler.emitter is not None
        return self._handler.emitter.emit

    # -- requests -------------------------------------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        accept_any_exec_command(chan)  # a command that is not UTF-8 reaches exec_requested (ssh/wire.py)
        self._emit(CHANNEL_OPEN, channel=self._number)

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: object) -> bool:
        cols, rows = _clamp(term_size[0], term_size[1])
        self._term = term_type[:64] or "vt100"
        self._size = TermSize(cols, rows)
        self._emit(CHANNEL_PTY, channel=self._number, term=self._term, width=cols, height=rows)
        self._emit(CLIENT_SIZE, width=cols, height=rows)
        return True

    def shell_requested(self) -> bool:
        self._kind = "shell"
        self._emit(CHANNEL_SHELL, channel=self._number)
        return True

    def exec_requested(self, command: str) -> bool:
        self._kind = "exec"
        # sshd hands the command to execve: it ends at the first NUL.
        raw = command.encode("utf-8", "surrogateescape").split(b"\0", 1)[0]
        fields: dict[str, object] = {}
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            # Not UTF-8 (ssh/wire.py lets it through as sshd does). The record keeps a string, with each
            # invalid byte as a \xNN escape, and the exact bytes in base64; the engine's API carries text only,
            # so the box runs it with U+FFFD for those bytes.
            fields = {"utf8": False, "input_b64": base64.b64encode(raw[:MAX_COMMAND]).decode("ascii")}
            text = raw.decode("utf-8", "backslashreplace")
            self._command = raw.decode("utf-8", "replace")[:MAX_COMMAND]
        else:
            self._command = text[:MAX_COMMAND]
        recorded = text[:MAX_COMMAND]
        self._emit(CHANNEL_EXEC, channel=self._number, input=recorded, **fields)
        self._emit(COMMAND_INPUT, input=recorded, channel=self._number, source="exec", **fields)
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        self._emit(CHANNEL_SUBSYSTEM, channel=self._number, subsystem=subsystem[:64])
        if subsystem not in _SUBSYSTEMS:
            return False
        self._kind = "subsystem"
        self._command = subsystem
        return True

    def session_started(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    # -- data -----------------------------------------------------------------------------------
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        if self._relay is not None:
            self._relay.feed(data)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > HIGH_WATER and self._chan is not None:
            self._chan.pause_reading()

    def eof_received(self) -> bool:
        if self._relay is not None:
            self._relay.feed_eof()
        else:
            self._pending_eof = True
        return True

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        cols, rows = _clamp(width, height)
        self._size = TermSize(cols, rows)
        self._emit(CLIENT_SIZE, width=cols, height=rows, channel=self._number)
        if self._relay is not None:
            asyncio.get_running_loop().create_task(self._relay.resize(self._size))

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.set_writable(False)

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.set_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- ChannelPort for the relay ----------------------------------------------------------------
    def send(self, data: bytes, stderr: bool) -> None:
        if self._chan is None or self._chan.is_closing():
            return
        if stderr:
            self._chan.write_stderr(data)
        else:
            self._chan.write(data)

    def pause_reading(self) -> None:
        if self._chan is not None:
            self._chan.pause_reading()

    def resume_reading(self) -> None:
        if self._chan is not None:
            self._chan.resume_reading()

    # -- the process in the box -------------------------------------------------------------------
    async def _run(self) -> None:
        h = self._handler
        session_context.set(f"{h.session} {h.src_ip}")
        chan = self._chan
        assert chan is not None
        try:
            lease = await h.lease()
            account = await h.ctx.manager.account(lease, h.username, h.password)
            # The server address a login sees (SSH_CONNECTION, `ss` in the box) is one of the box's own, as a
            # server behind NAT shows its private address: the box's eth0 for a client off loopback.
            server_ip = h.dst_ip
            if not is_loopback(h.src_ip):
                server_ip = await lease.sandbox.network_address() or h.dst_ip
            peer = Peer(h.src_ip, h.src_port, server_ip, h.dst_port)
            client_env = self._client_env(chan)
            # One login per connection, as sshd has: the first shell or exec channel's helper logs it (the
            # failed passwords, "Accepted", the PAM session); the connection's end logs its close once.
            first = self._kind != "subsystem" and h.login_id is None
            if first:
                h.login_id = lease.logins.new_id()
                h.login_account = account
            method = h.auth_method if first else None
            failures = list(h.failed_logins) if first else []
            port = h.ctx.settings.ssh.advertised_port
            env = login_env(account, peer, client_env, self._term, port, h.login_id)
            tty = self._size if self._term is not None else None
            workdir = account.home
            user = "root"  # the session helper runs as root and drops to the account itself
            scope = lease.sandbox.features.login_scopes and h.login_id is not None
            if self._kind == "shell":
                argv = shell_argv(account, env, peer, method, failures, scope)
                # Keystrokes become command lines (PTY or not: bots pipe commands into a shell).
                self.observers.append(CommandReconstructor(self._command_typed))
            elif self._kind == "exec":
                argv = exec_argv(account, env, peer, method, self._command, failures, scope)
                if is_scp_sink(self._command):
                    self._transfers = True
                    self.observers.append(ScpWatcher(self._scp_report(account.home)))
            else:
                argv = sftp_argv(env)
                user = account.name
                self._transfers = True
                self.observers.append(SftpWatcher(self._sftp_report(account.home)))
            # The connection's login shows its TCP connection in the box, as sshd's does (sandbox.connection_in_box),
            # and its processes go where pam_systemd puts a login's (the helper waits for that).
            login = Login(
                uid=account.uid,
                session_id=h.login_id if scope else None,
                client=ClientAddress(h.src_ip, h.src_port, server_ip) if first else None,
            )
            self._process = await lease.sandbox.exec(argv, tty=tty, user=user, workdir=workdir, login=login)
            if self._kind != "subsystem":  # no cast of the binary SFTP protocol (its requests are events)
                self._open_cast(account.shell)
            if self._kind == "shell":  # the interactive terminal can be watched live, read-only
                self._live = LiveTap(h.ctx.live, h.session, self._size or TermSize(80, 24))
                self.observers.append(self._live)
            relay = Relay(self._process, self, h.usage, self.observers)
            self._relay = relay
            while self._pending:
                relay.feed(self._pending.popleft())
            if self._pending_bytes > HIGH_WATER:
                chan.resume_reading()
            if self._pending_eof:
                relay.feed_eof()
            status = await relay.run()
            self._emit(CHANNEL_EXIT, channel=self._number, exit_status=status.code, signal=status.signal)
            if status.signal:
                chan.exit_with_signal(status.signal)
            else:
                chan.exit(status.code)
        except asyncio.CancelledError:
            raise
        except SandboxError as exc:
            log.warning("channel %d: sandbox failed: %s", self._number, exc)
            # What a client sees when sshd cannot start the session: the connection goes away.
            h.end("sandbox_error", str(exc)[:200], limit=False)
        except Exception:
            log.exception("channel %d failed", self._number)
            chan.close()
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
                h.track(self._collect_uploads())
            self._emit(CHANNEL_CLOSED, channel=self._number, bytes_in=h.usage.bytes_in, bytes_out=h.usage.bytes_out)

    def _reporter(self, eventid: str) -> Callable[..., object]:
        def report(**fields: object) -> object:
            return self._emit(eventid, channel=self._number, **fields)

        return report

    def _command_typed(self, line: str) -> None:
        self._emit(COMMAND_INPUT, input=line, channel=self._number, source="tty")

    def _open_cast(self, shell: str) -> None:
        h = self._handler
        rec = h.ctx.settings.recording
        if not rec.casts:
            return
        size = self._size if self._term is not None else None
        ttylog = Path("casts") / h.session / f"{self._number}.cast"
        self._cast = CastRecorder(
            h.ctx.settings.data_dir / ttylog,
            width=size.cols if size else 80,
            height=size.rows if size else 24,
            term=self._term or "",
            shell=shell,
            title=f"{h.session} from {h.src_ip} (channel {self._number})",
            flush_interval_s=rec.cast_flush_interval_s,
            max_bytes=rec.max_cast_bytes,
            health=h.ctx.recording,
        )
        self.observers.append(self._cast)
        self._emit(LOG_OPEN, ttylog=str(ttylog), channel=self._number)

    def _close_cast(self) -> None:
        cast, self._cast = self._cast, None
        if cast is None:
            return
        path, size, sha, duration = cast.close()
        self._emit(
            LOG_CLOSED,
            ttylog=str(path.relative_to(self._handler.ctx.settings.data_dir)),
            channel=self._number,
            size=size,
            shasum=sha,
            duration=f"{duration:.1f}",
            duration_ms=int(duration * 1000),
            duplicate=False,  # Cowrie's field: each cast has a path of its own, never a duplicate
        )

    async def _collect_uploads(self) -> None:
        h = self._handler
        lease = await h.lease()
        await h.artifacts.collect_uploads(lease.sandbox, self._reporter(SESSION_FILE_UPLOAD))

    def _sftp_report(self, cwd: str) -> Callable[..., object]:
        emit = self._reporter(SFTP_REQUEST)

        def report(**fields: object) -> object:
            if fields.get("op") == "open" and "write" in str(fields.get("flags", "")):
                self._handler.artifacts.note_upload(str(fields["path"]), "sftp", cwd)
            return emit(**fields)

        return report

    def _scp_report(self, cwd: str) -> Callable[..., object]:
        emit = self._reporter(SCP_FILE)
        # "scp -t TARGET": TARGET is a directory (file goes inside) or the file itself.
        words = self._command.split()
        target = next((w for w in reversed(words[1:]) if not w.startswith("-")), ".")

        def report(**fields: object) -> object:
            if fields.get("kind") == "file":
                name = str(fields["filename"])
                self._handler.artifacts.note_upload(posixpath.join(target, name), "scp", cwd)
                self._handler.artifacts.note_upload(target, "scp", cwd)
            return emit(**fields)

        return report

    def _client_env(self, chan: asyncssh.SSHServerChannel[bytes]) -> dict[str, str]:
        env: dict[str, str] = {}
        limit = self._handler.ctx.settings.ssh.max_env_vars
        for key, value in list(chan.get_environment_bytes().items())[:limit]:
            k = key.decode("utf-8", "replace") if isinstance(key, bytes) else str(key)
            v = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            self._emit(CLIENT_VAR, name=k[:256], value=v[:1024], channel=self._number)
            env[k] = v
        return env


def _clamp(cols: int, rows: int) -> tuple[int, int]:
    """Window sizes as a kernel pty takes them; 0 (unknown) becomes the classic 80x24."""
    return (min(max(cols, 1), 1000) if cols else 80, min(max(rows, 1), 1000) if rows else 24)
