"""The Relay between a channel and a process of the fake box: bytes both ways, back-pressure both ways,
EOF, exit status and resizes."""

from __future__ import annotations

import asyncio

from sandtrap.bridge.proxy import HIGH_WATER, Relay, Usage
from sandtrap.sandbox.base import ExitStatus, Sandbox, TermSize

from fakes import ChrootSandbox


class Port:
    """The SSH channel as the relay sees it: what was sent, and whether reading is paused."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.paused = False
        self.pauses = 0
        self.resumes = 0

    def send(self, data: bytes, stderr: bool) -> None:
        (self.err if stderr else self.out).extend(data)

    def pause_reading(self) -> None:
        self.paused = True
        self.pauses += 1

    def resume_reading(self) -> None:
        self.paused = False
        self.resumes += 1


class Observer:
    def __init__(self) -> None:
        self.input = bytearray()
        self.output = bytearray()
        self.sizes: list[TermSize] = []

    def on_input(self, data: bytes) -> None:
        self.input += data

    def on_output(self, data: bytes, stderr: bool) -> None:
        self.output += data

    def on_resize(self, size: TermSize) -> None:
        self.sizes.append(size)


async def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():  # type: ignore[operator]
            await asyncio.sleep(0.01)


async def test_bytes_cross_both_ways_and_eof_ends_the_process(box: Sandbox) -> None:
    port, usage, seen = Port(), Usage(), Observer()
    relay = Relay(await box.exec(["cat"]), port, usage, [seen])
    task = asyncio.create_task(relay.run())
    relay.feed(b"hello ")
    relay.feed(b"box\n")
    await wait_for(lambda: port.out == b"hello box\n")
    relay.feed_eof()
    assert await asyncio.wait_for(task, 10) == ExitStatus(0)
    assert (usage.bytes_in, usage.bytes_out) == (10, 10)
    assert seen.input == seen.output == b"hello box\n"


async def test_stderr_and_the_exit_status_come_back(box: Sandbox) -> None:
    port = Port()
    relay = Relay(await box.exec(["sh", "-c", "echo out; echo err >&2; exit 7"]), port, Usage())
    relay.feed_eof()
    assert await asyncio.wait_for(relay.run(), 10) == ExitStatus(7)
    assert (bytes(port.out), bytes(port.err)) == (b"out\n", b"err\n")


async def test_an_exit_signal_comes_back(box: Sandbox) -> None:
    relay = Relay(await box.exec(["sh", "-c", "kill -TERM $$"]), Port(), Usage())
    relay.feed_eof()
    assert await asyncio.wait_for(relay.run(), 10) == ExitStatus(143, "TERM")


async def test_input_the_process_does_not_read_pauses_the_channel_until_it_drains(box: Sandbox) -> None:
    port = Port()
    relay = Relay(await box.exec(["sh", "-c", "sleep 2; exec wc -c"]), port, Usage())
    task = asyncio.create_task(relay.run())
    block = b"x" * 32768
    total = 0
    while not port.paused:  # the process does not read yet: its pipe fills, then the relay's queue
        relay.feed(block)
        total += len(block)
        await asyncio.sleep(0)
        assert total < 16 * HIGH_WATER, "the channel was never paused"
    assert total > HIGH_WATER and port.pauses == 1
    await wait_for(lambda: not port.paused)  # the process reads again: the channel resumes
    relay.feed_eof()
    assert await asyncio.wait_for(task, 10) == ExitStatus(0)
    assert port.resumes == port.pauses == 1
    assert int(port.out) == total  # every byte, once


async def test_a_channel_that_cannot_take_more_holds_the_process_back(box: ChrootSandbox) -> None:
    port = Port()
    proc = await box.exec(["sh", "-c", "seq 1 1000000; echo done > /tmp/done"])
    relay = Relay(proc, port, Usage())
    relay.set_writable(False)  # the SSH window is closed
    relay.feed_eof()
    task = asyncio.create_task(relay.run())
    await asyncio.sleep(0.5)
    assert len(port.out) == 0
    assert await box.get_file("/tmp/done", 10) is None  # the writer waits for the reader
    relay.set_writable(True)
    assert await asyncio.wait_for(task, 20) == ExitStatus(0)
    assert port.out == "".join(f"{i}\n" for i in range(1, 1_000_001)).encode()


async def test_a_resize_reaches_the_terminal_and_the_observers(box: Sandbox) -> None:
    port, seen = Port(), Observer()
    relay = Relay(await box.exec(["sh", "-c", "read a; stty size"], tty=TermSize(80, 24)), port, Usage(), [seen])
    task = asyncio.create_task(relay.run())
    await relay.resize(TermSize(cols=120, rows=40))
    relay.feed(b"\r")
    assert await asyncio.wait_for(task, 10) == ExitStatus(0)
    assert b"40 120" in port.out and seen.sizes == [TermSize(120, 40)]
