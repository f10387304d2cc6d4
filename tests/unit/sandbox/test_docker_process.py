"""A process dropped without wait() or kill() gives its engine connection back when collected, silently."""

import gc
import warnings
from typing import Any

from sandtrap.sandbox.docker.process import DockerProcess


class FakeResponse:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


class FakeStream:
    def __init__(self) -> None:
        self._resp = FakeResponse()
        self._closed = False


def test_a_dropped_process_closes_its_stream() -> None:
    stream = FakeStream()
    proc = DockerProcess(Any, stream, tty=False)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        del proc
        gc.collect()
    assert stream._closed and stream._resp.closed


class Message:
    def __init__(self, stream: int, data: bytes) -> None:
        self.stream, self.data = stream, data


class ScriptedStream(FakeStream):
    """What a remote engine's exec sends: the announced pid line on stderr first, in pieces."""

    def __init__(self, messages: list[Message]) -> None:
        super().__init__()
        self._messages = messages

    async def read_out(self) -> Message | None:
        return self._messages.pop(0) if self._messages else None


async def _no_kill(pid: int) -> None:
    raise AssertionError("not called")


async def _read_all(proc: DockerProcess) -> list[tuple[int, bytes]]:
    out = []
    while (chunk := await proc.read()) is not None:
        out.append((chunk.stream, chunk.data))
    return out


async def test_the_announced_pid_is_taken_off_stderr_even_in_pieces() -> None:
    stream = ScriptedStream([Message(2, b"12"), Message(1, b"out"), Message(2, b"3\nerr"), Message(2, b"more")])
    proc = DockerProcess(Any, stream, tty=False, kill_in_box=_no_kill)  # type: ignore[arg-type]
    assert await _read_all(proc) == [(1, b"out"), (2, b"err"), (2, b"more")]
    assert proc.box_pid == 123
    stream._closed = True  # nothing to give back when collected


async def test_a_first_stderr_line_that_is_no_pid_is_passed_on_whole() -> None:
    stream = ScriptedStream([Message(2, b"sh: 1: exec: nope: not found\n")])
    proc = DockerProcess(Any, stream, tty=False, kill_in_box=_no_kill)  # type: ignore[arg-type]
    assert await _read_all(proc) == [(2, b"sh: 1: exec: nope: not found\n")]
    assert proc.box_pid == 0
    stream._closed = True


async def test_without_an_announcement_stderr_is_untouched() -> None:
    stream = ScriptedStream([Message(2, b"42\n")])
    proc = DockerProcess(Any, stream, tty=False)  # type: ignore[arg-type]
    assert await _read_all(proc) == [(2, b"42\n")] and proc.box_pid == 0
    stream._closed = True
