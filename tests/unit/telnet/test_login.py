"""login(1)'s line reading on a telnet connection: erase, kill, echo or not, typed-ahead bytes kept, bounds."""

from __future__ import annotations

from sandtrap.telnet.login import MAX_NAME, MAX_PENDING, Keyboard


def keyboard(echoes: bool = True) -> tuple[Keyboard, list[bytes]]:
    sent: list[bytes] = []
    return Keyboard(sent.append, lambda: echoes), sent


async def test_a_line_with_erase_and_kill_echoed() -> None:
    keys, sent = keyboard()
    keys.typed(b"rooo\x7ft\x08t\r")
    assert await keys.line(echo=True) == b"root"
    assert b"".join(sent) == b"rooo\b \bt\b \bt\r\n"
    keys.typed(b"junk\x15admin\nrest")
    assert await keys.line(echo=True) == b"admin"
    assert keys.take() == b"rest"  # what follows the line stays for the shell


async def test_password_is_not_echoed_and_client_side_echo_means_no_server_echo() -> None:
    keys, sent = keyboard()
    keys.typed(b"hunter2\r")
    assert await keys.line(echo=False) == b"hunter2" and sent == []
    keys, sent = keyboard(echoes=False)  # the client refused our WILL ECHO: it echoes itself
    keys.typed(b"root\r")
    assert await keys.line(echo=True) == b"root" and sent == [b"\r\n"]


async def test_bounds_and_end() -> None:
    keys, _ = keyboard(echoes=False)
    assert keys.typed(b"a" * MAX_PENDING) and not keys.typed(b"b")
    keys.pending[-1:] = b"\r"
    assert len(await keys.line(echo=True) or b"") == MAX_NAME  # a name is cut, not grown
    keys.take()
    keys.typed(b"no newline")
    keys.end()
    assert await keys.line(echo=True) is None
