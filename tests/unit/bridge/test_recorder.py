"""Cast recorder: header and frames as asciinema v2 reads them, decoding, truncation, flushing, errors."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from sandtrap.bridge.proxy import RelayObserver
from sandtrap.bridge.recorder import TRUNCATED, CastRecorder, raw_input_path
from sandtrap.sandbox.base import TermSize


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(path: Path, clock: FakeClock | None = None, **overrides: Any) -> CastRecorder:
    args: dict[str, Any] = {
        "width": 120,
        "height": 40,
        "term": "xterm-256color",
        "shell": "/bin/bash",
        "title": "abc123 from 203.0.113.9 (channel 0)",
        "flush_interval_s": 0.5,
        "max_bytes": 1 << 20,
        "clock": clock or FakeClock(),
    }
    args.update(overrides)
    return CastRecorder(path, **args)


def read_cast(path: Path) -> tuple[dict[str, Any], list[list[Any]]]:
    lines = path.read_text("utf-8").splitlines()
    header = json.loads(lines[0])
    return header, [json.loads(line) for line in lines[1:]]


def output_text(events: list[list[Any]]) -> str:
    return "".join(e[2] for e in events if e[1] == "o")


def test_header_and_frames(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "casts" / "abc123" / "0.cast"
    rec = make(path, clock)
    clock.advance(0.25)
    rec.on_output(b"\x1b[01;32mroot@box\x1b[00m:~# ", False)
    clock.advance(1.0000004)
    rec.on_input(b"id\r")
    clock.advance(0.1)
    rec.on_output(b"uid=0(root)\r\n", False)
    rec.on_output(b"oops\r\n", True)
    rec.on_resize(TermSize(132, 43))
    clock.advance(2)
    summary = rec.close()

    header, events = read_cast(path)
    assert header["version"] == 2
    assert (header["width"], header["height"]) == (120, 40)
    assert isinstance(header["timestamp"], int)
    assert header["env"] == {"TERM": "xterm-256color", "SHELL": "/bin/bash"}
    assert header["title"] == "abc123 from 203.0.113.9 (channel 0)"
    assert events == [
        [0.25, "o", "\x1b[01;32mroot@box\x1b[00m:~# "],
        [1.25, "i", "id\r"],
        [1.35, "o", "uid=0(root)\r\n"],
        [1.35, "o", "oops\r\n"],
        [1.35, "r", "132x43"],
    ]
    data = path.read_bytes()
    assert summary.path == path
    assert summary.size == len(data)
    assert summary.sha256 == hashlib.sha256(data).hexdigest()
    assert summary.duration_s == pytest.approx(3.35)
    path_, size, sha, duration = summary  # also a plain tuple
    assert (path_, size, sha, duration) == tuple(summary)
    assert raw_input_path(path).read_bytes() == b"id\r"
    assert rec.close() is summary  # idempotent


def test_is_a_relay_observer(tmp_path: Path) -> None:
    observer: RelayObserver = make(tmp_path / "c.cast")  # checked by mypy
    observer.on_input(b"")
    assert isinstance(observer, CastRecorder)
    observer.close()


def test_times_are_rounded_and_never_go_back(tmp_path: Path) -> None:
    clock = FakeClock(5.0)
    rec = make(tmp_path / "c.cast", clock)
    stamps = [0.1234567891, 0.2, 0.15, 7.0, 6.9]  # a clock that steps back is clamped
    for s in stamps:
        clock.now = 5.0 + s
        rec.on_output(b"x", False)
    rec.close()
    times = [e[0] for e in read_cast(tmp_path / "c.cast")[1]]
    assert times == sorted(times)
    assert times[0] == 0.123457
    assert all(len(repr(t).split(".")[-1]) <= 6 for t in times)


def test_utf8_split_across_chunks_and_streams(tmp_path: Path) -> None:
    rec = make(tmp_path / "c.cast")
    snowman = "☃".encode()  # 3 bytes
    rec.on_output(b"caf\xc3", False)
    rec.on_output(b"E: " + snowman[:1], True)  # stderr has its own decoder
    rec.on_output(b"\xa9 ok", False)
    rec.on_output(snowman[1:] + b"\n", True)
    rec.on_input("é".encode()[:1])
    rec.on_input("é".encode()[1:])
    rec.close()
    events = read_cast(tmp_path / "c.cast")[1]
    assert [e[1:] for e in events] == [["o", "caf"], ["o", "E: "], ["o", "é ok"], ["o", "☃\n"], ["i", "é"]]


def test_invalid_bytes_become_replacement_characters(tmp_path: Path) -> None:
    rec = make(tmp_path / "c.cast")
    rec.on_output(b"bad \xff\xfe end", False)
    rec.on_input(b"\x80x")
    rec.on_output(b"dangling \xe2\x98", False)  # cut by the end of the stream
    rec.close()
    events = read_cast(tmp_path / "c.cast")[1]
    assert output_text(events) == "bad \ufffd\ufffd end" + "dangling " + "\ufffd"
    assert [e[2] for e in events if e[1] == "i"] == ["\ufffdx"]
    assert raw_input_path(tmp_path / "c.cast").read_bytes() == b"\x80x"
    # Every line is valid UTF-8 JSON.
    (tmp_path / "c.cast").read_bytes().decode("utf-8")


def test_resize_frames(tmp_path: Path) -> None:
    rec = make(tmp_path / "c.cast")
    rec.on_resize(TermSize(80, 24))
    rec.on_resize(TermSize(1000, 1))
    rec.close()
    assert [e[1:] for e in read_cast(tmp_path / "c.cast")[1]] == [["r", "80x24"], ["r", "1000x1"]]


def test_output_past_max_bytes_is_counted_not_recorded(tmp_path: Path) -> None:
    rec = make(tmp_path / "c.cast", max_bytes=10)
    rec.on_output(b"123456", False)
    rec.on_output(b"789abc", False)
    rec.on_output(b"more and more", True)
    rec.on_input(b"typed\r")
    rec.on_resize(TermSize(90, 30))
    rec.close()
    events = read_cast(tmp_path / "c.cast")[1]
    assert output_text(events) == "123456789a"
    assert [e[1:] for e in events if e[1] == "m"] == [["m", TRUNCATED]]
    assert [e[1] for e in events] == ["o", "o", "m", "i", "r"]
    assert rec.is_truncated
    assert rec.bytes_out == 25


def test_input_past_max_bytes_is_cut_too(tmp_path: Path) -> None:
    rec = make(tmp_path / "c.cast", max_bytes=4)
    rec.on_input(b"abc")
    rec.on_input(b"def")
    rec.on_input(b"ghi")
    rec.close()
    events = read_cast(tmp_path / "c.cast")[1]
    assert [e[1:] for e in events] == [["i", "abc"], ["i", "d"], ["m", "input truncated"]]
    assert raw_input_path(tmp_path / "c.cast").read_bytes() == b"abcd"
    assert rec.bytes_in == 9


def run_on_fake_time(clock: FakeClock, scenario: Callable[[], Awaitable[None]]) -> None:
    """A private event loop whose time is ``clock``, so timers fire when the test advances it."""
    loop = asyncio.new_event_loop()
    loop.time = clock  # type: ignore[method-assign]
    try:
        loop.run_until_complete(scenario())
    finally:
        loop.close()


async def let_loop_run() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


def test_periodic_flush_puts_frames_on_disk_without_close(tmp_path: Path) -> None:
    clock = FakeClock()
    path = tmp_path / "c.cast"

    async def scenario() -> None:
        rec = make(path, clock, flush_interval_s=0.5)
        assert len(path.read_bytes().splitlines()) == 1  # the header is on disk at once
        rec.on_output(b"hello\r\n", False)
        rec.on_input(b"x")
        await let_loop_run()
        clock.advance(0.4)
        await let_loop_run()
        assert len(path.read_bytes().splitlines()) == 1  # still buffered
        assert raw_input_path(path).read_bytes() == b""
        clock.advance(0.2)
        await let_loop_run()
        events = read_cast(path)[1]
        assert [e[1:] for e in events] == [["o", "hello\r\n"], ["i", "x"]]
        assert raw_input_path(path).read_bytes() == b"x"
        # Armed again by the next write.
        rec.on_output(b"again", False)
        clock.advance(0.6)
        await let_loop_run()
        assert output_text(read_cast(path)[1]) == "hello\r\nagain"
        rec.close()

    run_on_fake_time(clock, scenario)


def test_close_cancels_the_flush_timer(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        rec = make(tmp_path / "c.cast", clock)
        rec.on_output(b"x", False)
        rec.close()
        clock.advance(1)
        await let_loop_run()  # the timer must not touch the closed file
        assert rec.errors == 0

    run_on_fake_time(clock, scenario)


def feed_everything(rec: CastRecorder) -> None:
    rec.on_output(b"out", False)
    rec.on_output(b"err", True)
    rec.on_input(b"in")
    rec.on_resize(TermSize(10, 10))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_counted_not_raised(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        rec = make(ro / "c.cast")
        feed_everything(rec)
        summary = rec.close()
    finally:
        ro.chmod(0o700)
    assert rec.errors == 1
    assert not rec.is_recording
    assert summary.size == 0


def test_unwritable_path_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    rec = make(blocker / "casts" / "c.cast")
    feed_everything(rec)
    summary = rec.close()
    assert rec.errors == 1
    assert summary.size == 0
    assert summary.sha256 == hashlib.sha256(b"").hexdigest()


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_stops_recording_without_raising() -> None:
    rec = make(Path("/dev/full"))  # every flush fails with ENOSPC
    assert rec.errors == 1
    assert not rec.is_recording
    feed_everything(rec)
    rec.close()
    assert rec.errors == 1
    assert rec.bytes_out == 6  # still counted for the closing record


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_disk_full_mid_stream_stops_at_the_periodic_flush(tmp_path: Path) -> None:
    clock = FakeClock()

    async def scenario() -> None:
        rec = make(tmp_path / "c.cast", clock)
        rec.on_output(b"before", False)
        assert rec._file is not None
        rec._file.close()
        rec._file = open("/dev/full", "wb")  # the disk fills up under the recorder
        rec.on_output(b"x" * 1000, False)
        clock.advance(1)
        await let_loop_run()
        assert rec.errors == 1
        assert not rec.is_recording
        feed_everything(rec)  # ignored, counted
        summary = rec.close()
        assert rec.errors == 1
        assert rec.bytes_out == 1006 + 6
        assert summary.size == len((tmp_path / "c.cast").read_bytes())

    run_on_fake_time(clock, scenario)
