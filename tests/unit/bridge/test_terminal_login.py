"""login(1)'s own prompts answered for a telnet login (bridge/terminal_login.py), and its arguments."""

from __future__ import annotations

import asyncio

import pytest

from sandtrap.bridge.login import Account, terminal_login_argv
from sandtrap.bridge.terminal_login import answer, answerable
from sandtrap.sandbox.base import STDOUT, Chunk, ExitStatus, TermSize

ROOT = Account("root", 0, "/root", "/bin/bash")


class Login:
    """A login on a pty, as scripted output: each chunk is read only once the answers due before it were written."""

    def __init__(self, script: list[tuple[bytes, int]]) -> None:
        self.script = list(script)  # (output, how many writes must have come first)
        self.written: list[bytes] = []

    async def read(self) -> Chunk | None:
        if not self.script:
            await asyncio.sleep(3600)  # a login that says nothing more
        data, after = self.script.pop(0)
        assert len(self.written) >= after, (data, self.written)
        return Chunk(STDOUT, data)

    async def write(self, data: bytes) -> None:
        self.written.append(data)

    async def close_stdin(self) -> None:
        pass

    async def resize(self, size: TermSize) -> None:
        pass

    async def wait(self) -> ExitStatus:
        return ExitStatus(0)

    async def kill(self) -> None:
        pass


async def test_the_name_then_the_password_and_only_what_follows_is_passed_on() -> None:
    login = Login([(b"\r\nbox login: ", 0), (b"Pass", 1), (b"word: ", 1), (b"\r\nLast login: x\r\n", 2), (b"# ", 2)])
    done = await answer(login, "root", "hunter 2", ask_user=True)
    assert done is not None
    assert login.written == [b"root\n", b"hunter 2\n"]
    assert await done.read() == Chunk(STDOUT, b"Last login: x\r\n")
    assert await done.read() == Chunk(STDOUT, b"# ")


async def test_a_name_on_the_command_line_gets_the_password_prompt_only() -> None:
    login = Login([(b"Password: ", 0), (b"\r\n", 1), (b"$ ", 1)])
    done = await answer(login, "root", "pw", ask_user=False)
    assert done is not None and login.written == [b"pw\n"]


async def test_the_boxs_login_incorrect_is_no_answer() -> None:
    login = Login([(b"Password: ", 0), (b"\r\n", 1), (b"\r\nLogin incorrect\r\nbox login: ", 1)])
    assert await answer(login, "root", "pw", ask_user=False) is None


async def test_no_prompt_or_a_login_that_ends_is_no_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sandtrap.bridge.terminal_login.DIALOGUE_TIMEOUT_S", 0.05)
    assert await answer(Login([(b"nothing like a prompt", 0)]), "root", "pw", ask_user=True) is None
    assert await answer(Login([(b"x" * 20000, 0)]), "root", "pw", ask_user=True) is None  # bounded


@pytest.mark.parametrize(
    ("user", "password", "ok"),
    [
        ("root", "hunter2", True),
        ("root", "with space", True),
        ("root", "", False),  # cannot match an account
        ("root", "a\x7fb", False),  # the pty's erase character
        ("root", "x\x03", False),  # interrupt
        ("root", "x\x15y", False),  # kill line
        ("root", "p" * 256, False),
        ("ro\not", "pw", False),
    ],
)
def test_what_can_be_typed_into_logins_prompts(user: str, password: str, ok: bool) -> None:
    assert answerable(user, password) is ok


def test_logins_arguments_as_telnetd_gives_them() -> None:
    def args(env: dict[str, str], answered: bool) -> list[str | bytes]:
        argv = terminal_login_argv(ROOT, "127.0.0.1", None, env, answered)
        return argv[argv.index("/bin/login") :]

    assert args({}, True) == ["/bin/login", "-p", "-h", "localhost"]
    assert args({"USER": "root"}, True) == ["/bin/login", "-p", "-h", "localhost", "root"]  # telnet -l root
    assert args({"USER": "admin"}, True) == ["/bin/login", "-p", "-h", "localhost"]  # logged in as another
    assert args({}, False) == ["/bin/login", "-p", "-h", "localhost", "-f", "root"]
    argv = terminal_login_argv(ROOT, "198.51.100.2", None, {}, True)
    assert argv[-2:] == ["-h", "198.51.100.2"]
