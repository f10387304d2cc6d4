"""The guest agent client (sandbox/microvm/agent.py): the argv it sends, run here by the host's own sh and bash
(the guest runs the same Debian tools), and its protocol against a scripted agent on a unix socket."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import ExitStatus
from sandtrap.sandbox.microvm import agent


def _here(argv: list[str], stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(argv, input=stdin, capture_output=True, check=False, env=agent.BASE_ENV)


def test_a_plain_command_runs_in_a_session_of_its_own() -> None:
    argv = agent.command(["sh", "-c", "ps -o sid= -p $$; echo $$"], "root", 1000)
    assert argv[:2] == ["setsid", "-w"]
    sid, pid = _here(argv).stdout.split()
    assert sid == pid  # its group is what a timeout kills


def test_arguments_json_cannot_carry_are_passed_packed_and_arrive_exact() -> None:
    words: list[str | bytes] = ["printf", "%s|", b"\xff\xfe", "", "a b", "caf\udce9"]
    argv = agent.command(words, "root", 1000)
    json.dumps(argv).encode()  # every word is text now
    assert "bash" in argv and agent.DECODE_ARGV in argv
    assert _here(argv).stdout == b"\xff\xfe||a b|caf\xe9|"
    assert agent.command(["printf", "plain"], "root", 1000)[2:] == ["printf", "plain"]  # no packing needed


def test_a_nul_byte_or_no_argv_is_refused() -> None:
    with pytest.raises(SandboxError):
        agent.command(["echo", "a\0b"], "root", 1000)
    with pytest.raises(SandboxError):
        agent.command([], "root", 1000)


def test_more_output_than_the_agent_keeps_is_gzipped_and_the_status_kept() -> None:
    big = agent.CAPTURE_MAX + 1
    done = _here(agent.command(["sh", "-c", "head -c 5000 /dev/zero; echo err >&2; exit 4"], "root", big))
    assert done.returncode == 4 and done.stderr == b"err\n"
    assert gzip.decompress(done.stdout) == b"\0" * 5000
    reply = {"out-data": base64.b64encode(done.stdout).decode()}
    assert agent.output(reply, "out-data", 100, gzipped=True) == b"\0" * 100  # capped after inflating
    cut = {"out-data": base64.b64encode(done.stdout[:-12]).decode()}  # the agent cut it short: what came first
    assert agent.output(cut, "out-data", big, gzipped=True).startswith(b"\0" * 100)


@pytest.mark.skipif(os.geteuid() != 0, reason="setpriv needs root to change user")
def test_another_user_is_taken_without_pam() -> None:
    argv = agent.command(["id", "-un"], "nobody", 1000)
    assert "runuser" not in argv and "su" not in argv  # both open a PAM session: a line in auth.log
    assert _here(argv).stdout == b"nobody\n"


def test_exit_status_from_the_agents_reply() -> None:
    assert agent.exit_status({"exited": True, "exitcode": 3}) == ExitStatus(3)
    assert agent.exit_status({"exited": True, "signal": 15}) == ExitStatus(143, "TERM")
    assert agent.exit_status({"exited": True, "signal": 9, "exitcode": 0}) == ExitStatus(137, "KILL")
    assert agent.exit_status({"exited": True}) == ExitStatus(255)


# -- the protocol, against a scripted agent ------------------------------------------------------------------
Handler = Callable[[dict[str, Any]], Any]


class FakeAgent:
    """Speaks qemu-ga's side: a stale reply and noise before each sync's delimiter, then one reply per line."""

    def __init__(self, handle: Handler) -> None:
        self.handle = handle
        self.connections = 0
        self.commands: list[str] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while line := await reader.readline():
                message = json.loads(line.lstrip(agent.DELIMITER))
                name = message["execute"]
                self.commands.append(name)
                if name == "guest-sync-delimited":
                    writer.write(b'{"return": {"pid": 1}}\n\x00garbage')  # left over from an earlier client
                    writer.write(agent.DELIMITER + json.dumps({"return": message["arguments"]["id"]}).encode() + b"\n")
                else:
                    reply = self.handle(message)
                    if reply is None:  # the agent dies mid-command
                        writer.close()
                        return
                    writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        finally:
            writer.close()


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "agent.sock"


async def _serving(path: Path, fake: FakeAgent) -> asyncio.Server:
    return await asyncio.start_unix_server(fake.serve, str(path))


async def test_run_syncs_polls_until_exited_and_decodes_both_streams(socket_path: Path) -> None:
    polls = 0

    def handle(message: dict[str, Any]) -> Any:
        nonlocal polls
        if message["execute"] == "guest-exec":
            args = message["arguments"]
            assert args["path"] == "setsid" and args["capture-output"] is True
            assert base64.b64decode(args["input-data"]) == b"in\0put"
            assert "PATH=" + agent.BASE_ENV["PATH"] in args["env"]
            return {"return": {"pid": 77}}
        polls += 1
        if polls < 3:
            return {"return": {"exited": False}}
        out, err = base64.b64encode(b"in\0put").decode(), base64.b64encode(b"oops\n").decode()
        return {"return": {"exited": True, "exitcode": 4, "out-data": out, "err-data": err}}

    fake = FakeAgent(handle)
    async with await _serving(socket_path, fake):
        client = agent.GuestAgent(socket_path, "vm", lambda: True)
        result = await client.run(["sh", "-c", "cat; exit 4"], b"in\0put", max_output=3)
        client.close()
    assert (result.status, result.stdout, result.stderr) == (ExitStatus(4), b"in\0", b"oop")
    assert fake.commands == ["guest-sync-delimited", "guest-exec", *["guest-exec-status"] * 3]


async def test_a_refusal_raises_and_a_dropped_agent_is_synced_again(socket_path: Path) -> None:
    answers: list[Any] = [{"error": {"class": "GenericError", "desc": "no such file"}}, None, {"return": {}}]
    fake = FakeAgent(lambda _message: answers.pop(0))
    async with await _serving(socket_path, fake):
        client = agent.GuestAgent(socket_path, "vm", lambda: True)
        with pytest.raises(SandboxError, match="refused guest-ping: no such file"):
            await client.ping()
        with pytest.raises(SandboxError, match="guest-ping"):  # the socket closed mid-command
            await client.ping()
        await client.ping()  # a new connection, synced first
        client.close()
    assert fake.connections == 2
    assert fake.commands.count("guest-sync-delimited") == 2


async def test_a_timeout_kills_the_commands_group(socket_path: Path) -> None:
    killed: list[list[str]] = []

    def handle(message: dict[str, Any]) -> Any:
        if message["execute"] == "guest-exec":
            if message["arguments"]["path"] == "kill":
                killed.append(message["arguments"]["arg"])
                return {"return": {"pid": 99}}
            return {"return": {"pid": 42}}
        return {"return": {"exited": bool(killed)}}

    async with await _serving(socket_path, FakeAgent(handle)):
        client = agent.GuestAgent(socket_path, "vm", lambda: True)
        with pytest.raises(TimeoutError):
            await client.run(["sleep", "100"], timeout_s=0.3)
        client.close()
    assert killed == [["-KILL", "--", "-42"]]


async def test_a_stopped_vm_is_not_dialled(socket_path: Path) -> None:
    client = agent.GuestAgent(socket_path, "vm", lambda: False)
    with pytest.raises(SandboxError, match="not running"):
        await client.ping()


async def test_objects_of_one_vm_share_its_agent_and_its_one_connection(socket_path: Path) -> None:
    """QEMU's chardev serves one client: a second connection would wait unanswered while the first is open."""
    fake = FakeAgent(lambda _message: {"return": {}})
    async with await _serving(socket_path, fake):
        first = agent.for_vm(socket_path, "vm", lambda: True)
        second = agent.for_vm(socket_path, "vm", lambda: True)
        assert first is second and agent.for_vm(socket_path.with_name("other.sock"), "vm", lambda: True) is not first
        await first.ping()
        await second.ping()
        first.close()
    assert fake.connections == 1


@pytest.mark.parametrize(
    "line",
    [
        b"[1, 2, 3]\n",  # not an object
        b'"return"\n',
        b"{" * 5000 + b"\n",  # nesting that would blow the parser's stack
        b'{"return": [' + b"0," * 100_000 + b"0]}\n",  # a list that would fill memory with objects
        b"\x00\xffnot json\n",
    ],
)
def test_what_is_not_an_agents_reply_is_refused_before_it_costs_anything(line: bytes) -> None:
    with pytest.raises(SandboxError):
        agent.parse_reply(line)


async def test_a_guest_that_took_the_agents_port_over_gets_refusals_not_a_crash(socket_path: Path) -> None:
    """Root in the guest can stop qemu-ga and answer on its port: every odd answer is a SandboxError."""
    answers: list[Any] = [
        {"return": "no pid"},  # guest-exec without an object
        {"return": {"pid": "12"}},  # a pid that is not a number
        {"error": ["not", "an", "object"]},
        {"return": {"pid": 5}},  # then a status with odd types: no crash, a plain result
        {"return": {"exited": True, "exitcode": "0", "signal": 999, "out-data": 7, "err-data": "@@not base64@@"}},
    ]
    fake = FakeAgent(lambda _message: answers.pop(0))
    async with await _serving(socket_path, fake):
        client = agent.GuestAgent(socket_path, "vm", lambda: True)
        for _ in range(3):
            with pytest.raises(SandboxError):
                await client.run(["true"])
        result = await client.run(["true"])
        client.close()
    assert (result.status, result.stdout, result.stderr) == (ExitStatus(255), b"", b"")
