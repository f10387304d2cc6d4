"""Two logins to one box from two source addresses: the box's login records name each with its own.

Connection A (asyncssh from 127.0.0.1) and connection B (from 127.0.0.2) each hold an interactive
shell on a terminal open; B then runs ``last``, ``who`` and ``grep`` of auth.log on exec channels. Affinity ``source_ip`` keys a box
by address, so two addresses would get two boxes: the test gives the session manager one key for
both (what a shared key such as a NAT's would do), while each connection keeps its real address for
everything the box is told. After both close, A's closing lines appear under its ``Accepted`` pid,
read by the real OpenSSH client from 127.0.0.2 (``ssh -b``).

Only loopback addresses are used.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from typing import Any

import asyncssh
import pytest

from sandtrap.bridge.sessions import Lease
from sandtrap.events import SANDBOX_ASSIGNED, SESSION_CONNECT

from sshclient import HOST, PASSWORD, USER, run, ssh_argv

pytestmark = pytest.mark.timeout(180)

SECOND = "127.0.0.2"


async def shell_from(port: int, local: str) -> tuple[asyncssh.SSHClientConnection, asyncssh.SSHClientProcess[bytes]]:
    """An interactive login on a terminal from ``local``, once its prompt is there."""
    conn = await asyncssh.connect(
        HOST,
        port,
        local_addr=(local, 0),
        username=USER,
        password=PASSWORD,
        known_hosts=None,
        client_keys=None,
        agent_path=None,
        config=[],
        preferred_auth="password",
    )
    proc = await conn.create_process(term_type="xterm", term_size=(120, 40), encoding=None)
    seen = b""
    async with asyncio.timeout(30):
        while not re.search(rb"[#$] $", seen):
            seen += await proc.stdout.read(4096)
    return conn, proc


async def test_last_in_the_box_lists_both_logins_with_their_addresses(
    honeypot: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    hp = await honeypot(sandbox={"affinity": "source_ip"})
    manager = hp.services.manager
    lease = manager.lease

    async def one_box(session: str, src_ip: str, **kwargs: Any) -> Lease:
        return await lease(session, "both-test-addresses", **kwargs)

    monkeypatch.setattr(manager, "lease", one_box)

    conn_a, shell_a = await shell_from(hp.port, "127.0.0.1")
    conn_b, shell_b = await shell_from(hp.port, SECOND)
    port_a = conn_a.get_extra_info("sockname")[1]
    try:
        r_who = await conn_b.run("who", check=True)
        r = await conn_b.run(
            "last -n 10; echo ---; grep -E 'sshd\\[[0-9]+\\]: Accepted password for root from 127\\.0\\.0\\.[12] ' "
            "/var/log/auth.log",
            check=True,
        )
        last, accepted = str(r.stdout).split("---\n")
        who = str(r_who.stdout)

        # One box: both connections were given the same sandbox.
        sessions = {e.get("src_ip"): e.session for e in hp.events(SESSION_CONNECT)}
        assert set(sessions) == {"127.0.0.1", SECOND}, sessions
        boxes = {
            ip: (await hp.wait_for(SANDBOX_ASSIGNED, session=s))[0].get("sandbox_id") for ip, s in sessions.items()
        }
        assert boxes["127.0.0.1"] == boxes[SECOND], boxes

        # `last` (wtmp) and `who` (utmp): each login on its own terminal with its own address.
        logged_in = dict(re.findall(r"^root\s+(pts/\d+)\s+(\S+)\s.*still logged in", last, re.M))
        assert sorted(logged_in.values()) == ["127.0.0.1", SECOND], last
        who_rows = dict(re.findall(r"^root\s+(pts/\d+)\s.*\((\S+)\)\s*$", who, re.M))
        assert who_rows == logged_in, (who, last)

        # auth.log: one Accepted line per connection, each with its address and port.
        assert len(re.findall(rf"from 127\.0\.0\.1 port {port_a} ssh2", accepted)) == 1, accepted
        assert len(re.findall(rf"from {re.escape(SECOND)} port \d+ ssh2", accepted)) == 1, accepted
        pid_a = re.search(rf"sshd\[(\d+)\]: Accepted password for root from 127\.0\.0\.1 port {port_a} ", accepted)
        assert pid_a is not None, accepted
    finally:
        for shell, conn in ((shell_a, conn_a), (shell_b, conn_b)):
            shell.close()
            conn.close()
            await conn.wait_closed()

    # A is over: sshd's closing lines for it, once, under the pid of its Accepted line.
    closing = (
        f"sshd[{pid_a.group(1)}]: Received disconnect from 127.0.0.1 port {port_a}:11: disconnected by user",
        f"sshd[{pid_a.group(1)}]: Disconnected from user root 127.0.0.1 port {port_a}",
        f"sshd[{pid_a.group(1)}]: pam_unix(sshd:session): session closed for user root",
    )
    out = ""
    async with asyncio.timeout(30):
        while not all(line in out for line in closing):
            await asyncio.sleep(0.5)
            r = await run(
                ssh_argv(hp.port, f"grep -F 'sshd[{pid_a.group(1)}]' /var/log/auth.log", options=["-b", SECOND])
            )
            out = r.out
    assert all(out.count(line) == 1 for line in closing), out
