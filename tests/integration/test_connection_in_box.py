"""Each login's TCP connection shows in the box (``sandbox.connection_in_box``, see sandbox/relay.py).

The real OpenSSH client logs in; while its session runs, ``ss -tnp state established`` in the box must show a
connection whose local end is :22, whose peer is the client's own address and port (SSH_CLIENT's), held by
the login's ``sshd: root [priv]`` worker; after logout it must be gone. From 127.0.0.1 and 127.0.0.2 (``ssh
-b``): the client end is made in the box's network namespace. From 198.51.100.2 (TEST-NET-2), on a network
namespace and veth pair this test creates and removes, with ``network: internal``: the client end is a
transparent socket on the host. Packets go only between the host, the test's own namespace and the box.
"""

from __future__ import annotations

import asyncio
import errno
import re
from dataclasses import replace
from typing import Any

import pytest

from sandtrap.sandbox.host import relay as relays

from helpers import NS_CLIENT, NS_HOST, box_of, client_netns  # noqa: F401 (a fixture)
from sandtrap_fixtures import BACKEND
from sshclient import PASSWORD, USER, client_options, ssh_argv, started
from sshclient import asyncssh_connected as connect

pytestmark = pytest.mark.timeout(180)

INIT = {"session_transport": "init"}
SCRIPT = 'echo "C=$SSH_CLIENT"; echo "S=$SSH_CONNECTION"; echo END; read x; echo bye'


async def in_box(sandbox: Any, script: str) -> str:
    proc = await sandbox.exec(["bash", "-c", script])
    await proc.close_stdin()
    out = bytearray()
    while (chunk := await proc.read()) is not None:
        out += chunk.data
    await proc.wait()
    return out.decode("utf-8", "replace")


def connection_lines(ss: str, ip: str, port: int) -> list[str]:
    """``ss -Htnp`` lines of a connection whose local end is :22 and whose peer is ip:port."""
    return [x for x in ss.splitlines() if re.search(rf"\S+:22\s+{re.escape(ip)}:{port}\s", x + " ")]


async def check_login(hp: Any, argv: list[str], client_ip: str, server_ip: str | None) -> None:
    """Logs in with ``argv`` (running SCRIPT), checks the box's view during the session and after it. The
    server end's address is ``server_ip``, or (None) the box's eth0 address."""
    async with started(argv) as proc:
        assert proc.stdout is not None and proc.stdin is not None
        lines: list[str] = []
        async with asyncio.timeout(60):
            while "END" not in lines:
                line = await proc.stdout.readline()
                assert line, (lines, await proc.stderr.read() if proc.stderr else b"")
                lines.append(line.decode().strip())
        ip, port_text, _ = lines[0].removeprefix("C=").split()
        port = int(port_text)
        assert ip == client_ip, lines
        box = await box_of(hp)
        if server_ip is None:
            server_ip = (await in_box(box, "ip -o -4 addr show dev eth0 | awk '{print $4}'")).strip().split("/")[0]
            assert server_ip, "the box has no eth0 address"
        # SSH_CONNECTION names the server end `ss` shows (a server behind NAT shows its own address).
        assert lines[1].removeprefix("S=").split()[:3] == [ip, port_text, server_ip], lines
        ss = await in_box(box, "ss -Htnp state established")
        mine = connection_lines(ss, ip, port)
        assert len(mine) == 1, ss
        assert re.search(rf"^\s*\d+\s+\d+\s+{re.escape(server_ip)}:22\s", mine[0]), mine
        owner = re.search(r'users:\(\("sshd",pid=(\d+),fd=\d+\)\)', mine[0])
        assert owner is not None, mine
        title = await in_box(box, f"ps -o args= -p {owner.group(1)}")
        assert title.strip() == "sshd: root [priv]", title
        # The box's own sshd still answers a genuine connection to :22 from inside.
        keyscan = await in_box(box, "timeout 10 ssh-keyscan -t ed25519 127.0.0.1 2>/dev/null")
        assert re.search(r"^127\.0\.0\.1 ssh-ed25519 AAAA", keyscan, re.M), keyscan
        proc.stdin.write(b"\n")  # logout
        await proc.stdin.drain()
        async with asyncio.timeout(30):
            assert await proc.wait() == 0
        async with asyncio.timeout(30):  # the box's end closes with its worker, the honeypot's with the session
            while connection_lines(await in_box(box, "ss -Htn state established"), ip, port):
                await asyncio.sleep(0.1)


async def test_loopback_clients_connection_shows_in_the_box(honeypot: Any) -> None:
    hp = await honeypot(sandbox=INIT)
    await check_login(hp, ssh_argv(hp.port, SCRIPT, options=["-T"]), "127.0.0.1", "127.0.0.1")
    await check_login(hp, ssh_argv(hp.port, SCRIPT, options=["-T", "-b", "127.0.0.2"]), "127.0.0.2", "127.0.0.1")


# --- a client off loopback: its own network namespace -----------------------------------------------------


@pytest.mark.parametrize("mode", ["internal", "capture"])
async def test_off_loopback_clients_connection_shows_in_the_box(honeypot: Any, client_netns: str, mode: str) -> None:
    if mode == "internal" and BACKEND == "nspawn":
        pytest.skip("network.mode internal is Docker's engine network (nspawn refuses it at start)")
    hp = await honeypot(ssh={"listen": f"{NS_HOST}:0"}, sandbox=INIT, network={"mode": mode})
    argv = ["ip", "netns", "exec", client_netns, "sshpass", "-p", PASSWORD, "ssh", *client_options(), "-T"]
    argv += ["-p", str(hp.port), f"{USER}@{NS_HOST}", SCRIPT]
    await check_login(hp, argv, NS_CLIENT, None)


# --- what goes wrong never fails the login -------------------------------------------------------------


async def test_a_relay_that_cannot_connect_leaves_the_login_alone(
    honeypot: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The honeypot's connect fails (as when a process in the box holds the address): it says so, and the
    login starts at once by the listener, without a connection."""

    def taken(plan: relays.RelayPlan) -> Any:
        raise OSError(errno.EADDRINUSE, "Address already in use")

    monkeypatch.setattr(relays, "connect_in_box", taken)
    hp = await honeypot(sandbox=INIT)
    async with connect(hp) as conn:
        r = await conn.run('echo "$SSH_CLIENT"; ps -o args= -p $(ps -o ppid= -p $PPID); ss -Htn state established')
        client, port, _ = r.stdout.splitlines()[0].split()
        assert r.stdout.splitlines()[1] == "sshd: root [priv]", r.stdout  # the listener's, not docker exec's
        assert not connection_lines(r.stdout, client, int(port)), r.stdout


async def test_a_connection_from_another_peer_goes_to_sshd(honeypot: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A connection to :22 whose peer no request announced is the box's own sshd's (here: the honeypot's, from
    the port after the announced one); the login's worker waits for the announced one a bounded time and
    starts the session without it."""
    real = relays.connect_in_box

    def off_by_one(plan: relays.RelayPlan) -> Any:
        return real(replace(plan, src_port=plan.src_port % 65535 + 1))

    monkeypatch.setattr(relays, "connect_in_box", off_by_one)
    hp = await honeypot(sandbox=INIT)
    async with connect(hp) as conn:
        r = await conn.run('echo "$SSH_CLIENT"; ps -o args= -p $(ps -o ppid= -p $PPID); ss -Htnp state established')
        client, port, _ = r.stdout.splitlines()[0].split()
        assert r.stdout.splitlines()[1] == "sshd: root [priv]", r.stdout
        assert not connection_lines(r.stdout, client, int(port)), r.stdout
        other = connection_lines(r.stdout, client, int(port) % 65535 + 1)
        assert len(other) == 1 and '"sshd"' in other[0], r.stdout  # held by an `sshd -i`
        pid = re.search(r"pid=(\d+)", other[0])
        assert pid is not None
        r = await conn.run(f"ps -o args= -p {pid.group(1)}")
        assert r.stdout.strip() != "sshd: root [priv]", r.stdout
