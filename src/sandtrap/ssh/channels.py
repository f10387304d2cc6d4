"""asyncssh's callbacks for one SSH session channel, handed to the bridge's :class:`~sandtrap.bridge.channel.Channel`
(which starts, relays and records the process in the box)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import asyncssh

from sandtrap.bridge.channel import Channel
from sandtrap.sandbox.base import ExitStatus
from sandtrap.ssh.wire import accept_any_exec_command


class ChannelBridge(asyncssh.SSHServerSession[bytes]):
    def __init__(self, channel: Channel, max_env_vars: int, on_closed: Callable[[], None] = lambda: None) -> None:
        self._channel = channel
        self._max_env_vars = max_env_vars
        self._on_closed = on_closed  # once, when the channel is gone
        self._chan: asyncssh.SSHServerChannel[bytes] | None = None
        self._task: asyncio.Task[None] | None = None

    # -- requests -------------------------------------------------------------------------------
    def connection_made(self, chan: asyncssh.SSHServerChannel[bytes]) -> None:
        self._chan = chan
        accept_any_exec_command(chan)  # a command that is not UTF-8 reaches exec_requested (ssh/wire.py)
        self._channel.opened()

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int], term_modes: object) -> bool:
        self._channel.pty(term_type, term_size[0], term_size[1])
        return True

    def shell_requested(self) -> bool:
        self._channel.shell()
        return True

    def exec_requested(self, command: str) -> bool:
        self._channel.exec(command.encode("utf-8", "surrogateescape"))
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        return self._channel.subsystem(subsystem)

    def session_started(self) -> None:
        assert self._chan is not None
        env = self._channel.client_env(self._chan.get_environment_bytes(), self._max_env_vars)
        self._task = asyncio.get_running_loop().create_task(self._channel.run(self, env))

    # -- data -----------------------------------------------------------------------------------
    def data_received(self, data: bytes, datatype: asyncssh.DataType) -> None:
        self._channel.feed(data, self)

    def eof_received(self) -> bool:
        self._channel.feed_eof()
        return True

    def signal_received(self, signal: str) -> None:
        self._channel.signal(signal)

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self._channel.resize(width, height)

    def pause_writing(self) -> None:
        self._channel.set_writable(False)

    def resume_writing(self) -> None:
        self._channel.set_writable(True)

    def connection_lost(self, exc: Exception | None) -> None:
        on_closed, self._on_closed = self._on_closed, lambda: None
        on_closed()
        if self._task is not None and not self._task.done():
            self._task.cancel()

    # -- the bridge's Port ----------------------------------------------------------------------
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

    def exit(self, status: ExitStatus) -> None:
        if self._chan is None:
            return
        if status.signal:
            self._chan.exit_with_signal(status.signal)
        else:
            self._chan.exit(status.code)

    def close(self) -> None:
        if self._chan is not None:
            self._chan.close()
