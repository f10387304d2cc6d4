"""The session broker's messages (boxwire.py): requests as listener.c reads them, replies and fds judged as hostile."""

from __future__ import annotations

import contextlib
import os
import struct

import pytest

from sandtrap.sandbox.base import ExitStatus, TermSize
from sandtrap.sandbox.host.boxwire import (
    MAGIC,
    MAX_REQUEST,
    BrokerError,
    Connect,
    Exited,
    Failed,
    Started,
    encode_request,
    parse_reply,
    wait_status,
)
from sandtrap.sandbox.host.broker import check_fds


def test_request_layout() -> None:
    data = encode_request(["/usr/bin/env", "-i", "A=1"], {"TERM": "xterm"}, "root", "/root", TermSize(132, 43))
    assert data[:4] == MAGIC
    flags, cols, rows, argc, envc = struct.unpack("<BHHHH", data[4:13])
    assert (flags, cols, rows, argc, envc) == (1, 132, 43, 3, 1)
    assert data[13:].split(b"\0")[:-1] == [b"root", b"/root", b"/usr/bin/env", b"-i", b"A=1", b"TERM=xterm"]
    assert data.endswith(b"\0")


def test_request_without_tty_and_odd_bytes() -> None:
    data = encode_request(["printf", "caf\udce9"], {}, "", "", None)
    assert struct.unpack("<BHHHH", data[4:13]) == (0, 0, 0, 2, 0)
    assert b"caf\xe9\0" in data  # surrogate-escaped bytes go back as they came


def test_request_with_the_peer_to_expect() -> None:
    data = encode_request(["sh"], {"A": "1"}, "root", "", None, "127.0.0.2 50627")
    assert struct.unpack("<BHHHH", data[4:13]) == (2, 0, 0, 1, 1)
    assert data[13:].split(b"\0")[:-1] == [b"root", b"", b"127.0.0.2 50627", b"sh", b"A=1"]


@pytest.mark.parametrize(
    ("argv", "env"),
    [
        ([], {}),
        (["a\0b"], {}),
        (["sh"], {"A=B": "x"}),
        (["sh"], {"": "x"}),
        (["x"] * 600, {}),
        (["x" * (MAX_REQUEST + 1)], {}),
    ],
)
def test_request_refused(argv: list[str], env: dict[str, str]) -> None:
    with pytest.raises(BrokerError):
        encode_request(argv, env, "root", "", None)


def test_replies() -> None:
    assert parse_reply(b"O" + struct.pack("<I", 812)) == Started(812)
    assert parse_reply(b"X" + struct.pack("<I", 3 << 8)) == Exited(ExitStatus(3))
    assert parse_reply(b"X" + struct.pack("<I", 9)) == Exited(ExitStatus(137, "KILL"))
    assert parse_reply(b"X" + struct.pack("<I", 143 << 8)) == Exited(ExitStatus(143, "TERM"))
    assert parse_reply(b"Ebad request") == Failed("bad request")
    assert parse_reply(b"R") == Connect(True)
    assert parse_reply(b"N") == Connect(False)


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"O",
        b"O\0\0\0\0",
        b"O" + struct.pack("<I", 1 << 30),
        b"X\1\2",
        b"X" + b"\0" * 8,
        b"E" + b"x" * 200,
        b"Z1234",
        b"R1",
        b"N\0",
    ],
)
def test_bad_replies(data: bytes) -> None:
    with pytest.raises(BrokerError):
        parse_reply(data)


def test_wait_status_stopped_is_not_trusted() -> None:
    assert wait_status(0x137F) == ExitStatus(255)


def test_fds_of_the_right_kind_are_kept_non_blocking() -> None:
    fds = [fd for pair in (os.pipe(), os.pipe()) for fd in pair][:3]
    kept = check_fds(fds, tty=False)
    try:
        assert kept == fds and not any(os.get_blocking(fd) for fd in kept)
    finally:
        for fd in fds:
            os.close(fd)


@pytest.mark.parametrize("case", ["too-few", "too-many", "wrong-kind"])
def test_unexpected_fds_are_closed(case: str, tmp_path: os.PathLike[str]) -> None:
    r, w = os.pipe()
    f = os.open(os.path.join(tmp_path, "file"), os.O_CREAT | os.O_RDWR)
    fds = {"too-few": lambda: [r, w], "too-many": lambda: [r, w, f, os.dup(r)], "wrong-kind": lambda: [r, w, f]}[case]()
    with pytest.raises(BrokerError):
        check_fds(fds, tty=False)
    for fd in fds:
        with pytest.raises(OSError):
            os.fstat(fd)
    for fd in (r, w, f):
        with contextlib.suppress(OSError):
            os.close(fd)


def test_a_pipe_is_not_a_pty_master() -> None:
    r, w = os.pipe()
    with pytest.raises(BrokerError):
        check_fds([r, os.dup(w)], tty=True)
    os.close(w)


def test_only_a_pty_master_passes_for_a_tty() -> None:
    master, slave = os.openpty()
    null = os.open("/dev/null", os.O_RDWR)
    r, w = os.pipe()
    try:
        assert check_fds([master, r], tty=True) == [master, r]
        with pytest.raises(BrokerError):
            check_fds([os.dup(null), os.dup(r)], tty=True)  # a character device, not /dev/ptmx
        with pytest.raises(BrokerError):
            check_fds([os.dup(master)], tty=True)  # the output pipe missing
    finally:
        for fd in (master, slave, null, r, w):
            os.close(fd)
