"""The telnet service as an attacker meets it: Debian's telnet client in a terminal, and a Mirai-style script.

Each test starts its own honeypot on 127.0.0.1 (random ports) with the services of config `services`.
"""

from __future__ import annotations

import asyncio
import json
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sandtrap.events import (
    CHANNEL_SHELL,
    CLIENT_SIZE,
    COMMAND_INPUT,
    LOG_CLOSED,
    LOGIN_FAILED,
    LOGIN_SUCCESS,
    SESSION_CLOSED,
    SESSION_CONNECT,
    TELNET_ANOMALY,
    TELNET_CLIENT,
)
from sandtrap.telnet import protocol as tp

from helpers import NS_CLIENT, NS_HOST, box_of, client_netns, run  # noqa: F401 (a fixture)
from sshclient import asyncssh_connected, tmux_session

pytestmark = pytest.mark.timeout(120)
Honeypot = Callable[..., Any]
HOSTNAME = "tn-test-1"


def services(**telnet: Any) -> dict[str, Any]:
    return {
        "services": [
            {"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0"},
            {"name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:0", **telnet},
        ],
        "sandbox": {"hostname": HOSTNAME},
        "telnet": {"failure_delay_s": 0.5},
    }


class Screen:
    """What a raw client has been sent (telnet commands stripped), read up to what it waits for."""

    def __init__(self, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.parser = tp.Parser(crlf=False)
        self.buf = b""

    async def until(self, needle: bytes, timeout_s: float = 20.0) -> bytes:
        async with asyncio.timeout(timeout_s):
            while needle not in self.buf:
                chunk = await self.reader.read(4096)
                if not chunk:
                    raise EOFError(self.buf)
                self.buf += b"".join(i.data for i in self.parser.feed(chunk) if isinstance(i, tp.Data))
        end = self.buf.index(needle) + len(needle)
        seen, self.buf = self.buf[:end], self.buf[end:]
        return seen


async def test_debian_telnet_client_logs_in_to_a_shell_in_the_box(honeypot: Honeypot) -> None:
    hp = await honeypot(**services())
    port = hp.services.port("telnet")
    async with tmux_session(["telnet", "127.0.0.1", str(port)], 100, 30) as t:
        await t.wait_for(rf"{HOSTNAME} login: ")
        await t.line("root")
        await t.wait_for("Password: ")
        started = time.monotonic()
        await t.line("wrong")
        await t.wait_for("Login incorrect")
        assert time.monotonic() - started >= 0.4  # login's delay before "Login incorrect"
        await t.wait_for(rf"Login incorrect\s+{HOSTNAME} login: ")
        await t.line("root")
        await t.wait_for("Password: ")
        await t.line("hunter2")
        await t.wait_for(r"root@.*# $", 30)
        screen = await t.screen()
        assert "hunter2" not in screen  # the password was not echoed
        await t.line("echo $((6*7)) $TERM $0; tty; who | grep -c pts")
        await t.wait_for(r"42 \S+ -bash")
        await t.resize(120, 40)
        await t.line("stty size")
        await t.wait_for(r"40 120")
        await t.line("exit")
        await t.wait_for("Connection closed by foreign host", 20)
    [closed] = await hp.wait_for(SESSION_CLOSED, protocol="telnet")
    session = closed.session
    events = hp.events(session=session)
    assert all(e.protocol == "telnet" for e in events)
    assert [e.get("password") for e in hp.events(LOGIN_FAILED, session)] == ["wrong"]
    assert [e.get("username") for e in hp.events(LOGIN_SUCCESS, session)] == ["root"]
    client = hp.events(TELNET_CLIENT, session)
    assert client and client[0].get("ttype")  # the client's terminal type (TTYPE)
    assert "NAWS" in client[0].get("options")
    assert (120, 40) in {(e.get("width"), e.get("height")) for e in hp.events(CLIENT_SIZE, session)}
    inputs = [e.get("input") for e in hp.events(COMMAND_INPUT, session)]
    assert "stty size" in inputs and "exit" in inputs
    assert hp.events(CHANNEL_SHELL, session)
    [log_closed] = await hp.wait_for(LOG_CLOSED, session=session)
    cast = (hp.settings.data_dir / log_closed.get("ttylog")).read_text().splitlines()
    assert json.loads(cast[0])["width"] == 100 or json.loads(cast[0])["height"] == 30
    assert any('"r"' in line and "120x40" in line for line in cast[1:]), "the resize is in the cast"


async def test_mirai_style_scripted_login(honeypot: Honeypot) -> None:
    hp = await honeypot(**services())
    reader, writer = await asyncio.open_connection("127.0.0.1", hp.services.port("telnet"))
    screen = Screen(reader)
    try:
        # Mirai answers no option (it sends raw bytes and waits for prompts).
        await screen.until(b"login: ")
        writer.write(b"admin\r\n")
        await screen.until(b"Password: ")
        writer.write(b"admin\r\n")
        await screen.until(b"Login incorrect")
        await screen.until(b"login: ")
        writer.write(b"root\r\n")
        await screen.until(b"Password: ")
        writer.write(b"hunter2\r\n")
        await screen.until(b"# ", 30)
        # As Mirai's scanner does: each command, then wait for a prompt; then its busybox probe.
        for line in (b"enable", b"system", b"shell", b"sh"):
            writer.write(line + b"\r\n")
            await screen.until(b"# ", 20)
        writer.write(b"/bin/busybox MIRAI\r\n")
        out = await screen.until(b"not found", 20)
        assert b"MIRAI" in out
        writer.write(b"exit\r\nexit\r\n")
        await writer.drain()
        async with asyncio.timeout(20):
            while await reader.read(4096):
                pass
    finally:
        writer.close()
    [closed] = await hp.wait_for(SESSION_CLOSED, protocol="telnet")
    inputs = [e.get("input") for e in hp.events(COMMAND_INPUT, closed.session)]
    for cmd in ("enable", "system", "shell", "sh", "/bin/busybox MIRAI"):
        assert cmd in inputs
    assert [e.get("username") for e in hp.events(LOGIN_FAILED, closed.session)] == ["admin"]
    # The API lists it by service and protocol, and the dashboard counts it.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30) as api:
        async with asyncio.timeout(30):
            while True:
                page = (await api.get("/api/v1/sessions", params={"service": "telnet"})).json()
                if page["total"] and page["items"][0]["ended_at"]:
                    break
                await asyncio.sleep(0.2)
        row = page["items"][0]
        assert (row["id"], row["protocol"], row["service"], row["username"]) == (
            closed.session,
            "telnet",
            "telnet",
            "root",
        )
        assert (await api.get("/api/v1/sessions", params={"protocol": "tcp"})).json()["total"] == 0
        dashboard = (await api.get("/")).text
        assert "Sessions per service" in dashboard and "/sessions?service=telnet" in dashboard
        listing = (await api.get("/sessions", params={"service": "telnet"})).text
        assert closed.session in listing


async def test_bad_input_floods_garbage_and_half_open(honeypot: Honeypot) -> None:
    hp = await honeypot(**services(), limits={"max_sessions_per_ip": 20})
    port = hp.services.port("telnet")
    # An option flood, a subnegotiation that never ends, garbage; then a normal login on another connection.
    _r1, w1 = await asyncio.open_connection("127.0.0.1", port)
    w1.write(bytes([tp.IAC, tp.DO, 99, tp.IAC, tp.WILL, 98]) * 20_000)
    w1.write(bytes([tp.IAC, tp.SB, tp.TTYPE]) + b"A" * 1_000_000)
    w1.write(bytes([tp.IAC, tp.SE]) + bytes(range(256)) * 100)
    await w1.drain()
    _r2, w2 = await asyncio.open_connection("127.0.0.1", port)  # half-open: says nothing, then half-closes
    r3, w3 = await asyncio.open_connection("127.0.0.1", port)
    s3 = Screen(r3)
    await s3.until(b"login: ")
    w3.write(b"root\r\n")
    await s3.until(b"Password: ")
    w3.write(b"hunter2\r\necho ok-$((40+2))\r\n")
    await s3.until(b"ok-42", 30)
    w2.write_eof()
    kinds = {e.get("kind") for e in await hp.wait_for(TELNET_ANOMALY, 2)}
    assert {"option_flood", "sub_overflow"} <= kinds
    w3.write(b"exit\r\n")
    for w in (w1, w2, w3):
        w.close()
    closed = await hp.wait_for(SESSION_CLOSED, 3, protocol="telnet")
    assert len({e.session for e in closed}) == 3
    assert "closed_before_login" in {e.get("reason") for e in closed}  # the half-open one
    assert len(hp.events(SESSION_CONNECT)) == 3


async def test_telnet_dash_l_user_retries_and_login_timeout(honeypot: Honeypot) -> None:
    hp = await honeypot(**{**services(), "telnet": {"failure_delay_s": 0.2, "login_retries": 2, "login_timeout_s": 3}})
    port = hp.services.port("telnet")
    # telnet -l root: the name comes by NEW-ENVIRON (USER), login asks for the password only.
    async with tmux_session(["telnet", "-l", "root", "127.0.0.1", str(port)], 80, 24) as t:
        await t.wait_for("Password: ")
        assert "login: " not in await t.screen()
        await t.line("hunter2")
        await t.wait_for(r"root@.*# $", 30)
        await t.line("exit")
        await t.wait_for("Connection closed by foreign host", 20)
    # LOGIN_RETRIES wrong passwords: login exits, the connection closes.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    screen = Screen(reader)
    for _ in range(2):
        await screen.until(b"login: ")
        writer.write(b"root\r\n")
        await screen.until(b"Password: ")
        writer.write(b"nope\r\n")
        await screen.until(b"Login incorrect")
    async with asyncio.timeout(10):
        assert await reader.read() == b""
    writer.close()
    # LOGIN_TIMEOUT: nothing typed.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    screen = Screen(reader)
    await screen.until(b"login: ")
    await screen.until(b"Login timed out after 3 seconds.", 10)
    writer.close()
    reasons = {e.get("reason") for e in await hp.wait_for(SESSION_CLOSED, 3, protocol="telnet")}
    assert {"login_retries", "login_timeout"} <= reasons


async def test_a_telnet_login_looks_like_inetd_and_telnetd_in_the_box(honeypot: Honeypot) -> None:
    """What Debian 12's openbsd-inetd + inetutils-telnetd show for a telnet login (compared on a throw-away box):
    login's parent is ``telnetd``, a child of ``/usr/sbin/inetd`` (PID 1's), which listens on :23; telnetd holds the
    connection on fds 0-2; ``w``, ``last`` and auth.log name the client as telnetd does (``localhost``)."""
    hp = await honeypot(**{**services(), "sandbox": {"hostname": HOSTNAME, "session_transport": "init"}})
    port = hp.services.port("telnet")
    async with tmux_session(["telnet", "-b", "127.0.0.1", "127.0.0.1", str(port)], 100, 30) as t:
        # inetutils' telnetd's host line (no /etc/issue.net), a blank line, then login's prompt
        await t.wait_for(rf"Linux {re.escape(platform.release())} \({HOSTNAME}\) \(pts/0\)\s+{HOSTNAME} login: ")
        await t.line("root")
        await t.wait_for("Password: ")
        await t.line("hunter2")
        await t.wait_for(r"root@.*# $", 30)
        [connect] = hp.events(SESSION_CONNECT)
        src_port = connect.get("src_port")
        box = await box_of(hp)
        tree = "login=$(pgrep -x login); t=$(ps -o ppid= -p $login | tr -d ' '); i=$(ps -o ppid= -p $t | tr -d ' '); "
        tree += "for p in $login $t $i; do ps -o comm=,args= -p $p; done; ps -o ppid= -p $i; ls -l /proc/$t/fd"
        code, out, err = await run(box, tree)
        lines = out.splitlines()
        # login's own arguments, as telnetd gives them (it asked for the password itself: no -f)
        assert code == 0 and lines[0].split() == ["login", "/bin/login", "-p", "-h", "localhost"], out + err
        assert lines[1].split() == ["telnetd", "telnetd"], out
        assert lines[2].split() == ["inetd", "/usr/sbin/inetd"], out
        assert lines[3].strip() == "1", out
        fds = {m.group(1) for m in re.finditer(r" (\d+) -> socket:", out)}
        assert {"0", "1", "2"} <= fds, out  # telnetd's connection on its stdio
        code, out, _ = await run(box, "ss -Htlnp 'sport = :23'; ss -Htnp state established '( sport = :23 )'")
        assert re.search(r"0\.0\.0\.0:23\s.*\"inetd\"", out), out
        assert re.search(rf"127\.0\.0\.1:23\s+127\.0\.0\.1:{src_port}\s.*\"telnetd\"", out), out
        code, out, _ = await run(box, "w -h; last -n 2; grep -a 'login\\[' /var/log/auth.log | tail -n 2")
        assert re.search(r"^root\s+pts/\d+\s+localhost\s", out, re.M), out  # w's FROM
        assert re.search(r"^\.telnet\s+pts/\d+\s+localhost\s", out, re.M), out  # telnetd's wtmp record
        assert re.search(r"login\[\d+\]: pam_unix\(login:session\): session opened for user root\(uid=0\)", out), out
        assert "ROOT LOGIN  on '/dev/pts/" in out and "from 'localhost'" in out, out
        await t.line("exit")
        await t.wait_for("Connection closed by foreign host", 20)


async def test_a_telnet_login_off_loopback_shows_the_clients_address(honeypot: Honeypot, client_netns: str) -> None:
    """The real telnet client at 198.51.100.2 (a namespace of the test's own), with the capture gateway: telnetd in
    the box holds a connection from that address to eth0:23, and login, ``w`` and ``last`` name it."""
    listen = f"{NS_HOST}:0"
    cfg = {
        "services": [
            {"name": "ssh", "protocol": "ssh", "listen": listen},
            {"name": "telnet", "protocol": "telnet", "listen": listen},
        ],
        "ssh": {"listen": listen},
        "sandbox": {"hostname": HOSTNAME, "session_transport": "init"},
        "network": {"mode": "capture"},
    }
    hp = await honeypot(**cfg)
    argv = ["ip", "netns", "exec", client_netns, "telnet", NS_HOST, str(hp.services.port("telnet"))]
    async with tmux_session(argv, 100, 30) as t:
        await t.wait_for(rf"{HOSTNAME} login: ")
        await t.line("root")
        await t.wait_for("Password: ")
        await t.line("hunter2")
        await t.wait_for(r"root@.*# $", 30)
        [connect] = hp.events(SESSION_CONNECT)
        box = await box_of(hp)
        script = "ss -Htnp state established '( sport = :23 )'; w -h; last -n 2; ps -o args= -p $(pgrep -x login)"
        _, out, _ = await run(box, script)
        assert re.search(rf":23\s+{re.escape(NS_CLIENT)}:{connect.get('src_port')}\s.*\"telnetd\"", out), out
        assert re.search(rf"^root\s+pts/\d+\s+{re.escape(NS_CLIENT)}\s", out, re.M), out
        assert re.search(rf"^\.telnet\s+pts/\d+\s+{re.escape(NS_CLIENT)}\s", out, re.M), out
        assert f"/bin/login -p -h {NS_CLIENT}" in out, out
        await t.line("exit")
        await t.wait_for("Connection closed by foreign host", 20)


async def warm(hp: Any) -> None:
    """Until the pool holds a warm box (a session then gets a claimed box, not one made on demand)."""
    async with asyncio.timeout(60):
        while not hp.services.pool._warm:
            await asyncio.sleep(0.1)


async def test_inetd_listens_on_23_only_in_the_boxes_of_a_sensor_with_telnet(honeypot: Honeypot) -> None:
    """With a telnet service a box shows inetd on :23 from its claim on: an SSH login sees it."""
    hp = await honeypot(**{**services(), "sandbox": {"hostname": HOSTNAME, "session_transport": "init"}})
    await warm(hp)
    async with asyncssh_connected(hp) as conn:
        r = await conn.run("for i in 1 2 3 4 5 6 7 8 9 10; do ss -Htlnp 'sport = :23' | grep -q . && break; "
                           "sleep 0.5; done; ss -Htlnp 'sport = :23'; ps -o args= -p $(pgrep -x inetd)")  # fmt: skip
    assert re.search(r"0\.0\.0\.0:23\s.*\"inetd\"", r.stdout) and "/usr/sbin/inetd" in r.stdout, r.stdout


async def test_no_inetd_in_the_boxes_of_a_sensor_without_telnet(honeypot: Honeypot) -> None:
    plain = await honeypot(sandbox={"hostname": HOSTNAME, "session_transport": "init"})
    await warm(plain)
    async with asyncssh_connected(plain) as conn:
        r = await conn.run("sleep 1; ss -Htln 'sport = :23'; pgrep -x inetd; echo end", check=False)
    assert r.stdout == "end\n", r.stdout
