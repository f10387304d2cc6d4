"""Raw TCP and UDP services into the attacker's own box: curl against the box's nginx through the fake HTTP, a UDP
client, one source IP seeing one machine over HTTP then SSH, the limits, and floods."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import struct
from collections.abc import Callable
from typing import Any

import pytest

from sandtrap.events import (
    LIMIT_HIT,
    SANDBOX_ASSIGNED,
    SESSION_CLOSED,
    STREAM_CLOSED,
    STREAM_INPUT,
    STREAM_OPEN,
)

from helpers import NS_CLIENT, NS_HOST, client_netns  # noqa: F401 (a fixture)
from sshclient import PASSWORD, USER, asyncssh_connected, client_options, run, started

pytestmark = pytest.mark.timeout(120)
Honeypot = Callable[..., Any]


def services(**http: Any) -> dict[str, Any]:
    return {
        "services": [
            {"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0"},
            {
                "name": "http",
                "protocol": "tcp",
                "listen": "127.0.0.1:0",
                "target_port": 80,
                "capture": {"pcap": True, "metadata": True},
                **http,
            },
            {"name": "echo", "protocol": "udp", "listen": "127.0.0.1:0", "target_port": 7777,
             "session": {"idle_timeout_seconds": 2}},
        ]
    }  # fmt: skip


async def curl(port: int, path: str, source: str = "127.0.0.1", *extra: str) -> str:
    done = await run(["curl", "-sS", "--max-time", "20", "--interface", source, *extra,
                      f"http://127.0.0.1:{port}{path}"])  # fmt: skip
    assert done.returncode == 0, done.err
    return done.out


async def test_curl_then_ssh_land_in_one_box_that_saw_the_attackers_address(honeypot: Honeypot) -> None:
    hp = await honeypot(**services())
    port = hp.services.port("http")
    page = await curl(port, "/probe-9f3a", "127.0.0.7")
    assert "<html" in page.lower() and "nginx" in page  # the box's nginx answered
    [opened] = await hp.wait_for(STREAM_OPEN)
    assert opened.protocol == "tcp" and opened.get("service") == "http" and opened.get("target_port") == 80
    [first] = await hp.wait_for(STREAM_INPUT)
    assert first.get("input").startswith("GET /probe-9f3a HTTP/1.1")
    [closed] = await hp.wait_for(STREAM_CLOSED)
    assert closed.get("bytes_in") > 0 and closed.get("bytes_out") > 0
    stream = (hp.settings.data_dir / closed.get("stream")).read_text().splitlines()
    header = json.loads(stream[0])
    assert header["service"] == "http" and header["target_port"] == 80 and header["src_ip"] == "127.0.0.7"
    assert {json.loads(line)[1] for line in stream[1:]} == {"i", "o"}
    pcap = (hp.settings.data_dir / closed.get("pcap")).read_bytes()
    assert struct.unpack("<I", pcap[:4])[0] == 0xA1B2C3D4 and b"GET /probe-9f3a" in pcap
    if shutil.which("tshark"):  # Wireshark's dissector reads it as the HTTP exchange it was
        fields = ["-T", "fields", "-e", "http.request.uri", "-e", "http.response.code", "-e", "tcp.checksum.status"]
        done = await run(["tshark", "-n", "-o", "tcp.check_checksum:TRUE", "-r", str(hp.settings.data_dir /
                          closed.get("pcap")), "-Y", "http", *fields])  # fmt: skip
        request, response = done.out.splitlines()[:2]
        assert request.split("\t") == ["/probe-9f3a", "", "1"], done.out  # 1: the TCP checksum is good
        assert response.split("\t")[1].isdigit() and response.split("\t")[2] == "1", done.out
    box = (await hp.wait_for(SANDBOX_ASSIGNED))[0].get("sandbox_id")
    # Then SSH from the same address: the same machine, whose nginx logged the attacker's own address.
    async with asyncssh_connected(hp, local_addr=("127.0.0.7", 0)) as conn:
        result = await conn.run("grep probe-9f3a /var/log/nginx/access.log", check=False)
    assert result.stdout.startswith("127.0.0.7 "), result.stdout
    assigned = await hp.wait_for(SANDBOX_ASSIGNED, 2)
    assert assigned[1].get("sandbox_id") == box and assigned[1].get("reused") is True


async def test_udp_peer_reaches_a_service_in_its_box_and_is_forgotten_when_idle(honeypot: Honeypot) -> None:
    hp = await honeypot(**services())
    # An echo service in the box, started over SSH (so the box is this IP's).
    async with asyncssh_connected(hp) as conn:
        script = (
            "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('127.0.0.1',7777))\n"
            "while True:\n d,a=s.recvfrom(65535)\n s.sendto(b'echo:'+d+b' from '+a[0].encode(),a)\n"
        )
        await conn.run(f'nohup python3 -c "{script}" >/dev/null 2>&1 &', check=False)
        await asyncio.sleep(1.0)
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", hp.services.port("echo")))
            for i in range(3):
                await loop.sock_sendall(s, b"ping%d" % i)
                async with asyncio.timeout(10):
                    reply = await loop.sock_recv(s, 65535)
                assert reply == b"echo:ping%d from 127.0.0.1" % i
    closed = await hp.wait_for(STREAM_CLOSED, timeout_s=15, transport=None)
    udp = [e for e in closed if e.protocol == "udp"]
    assert udp and udp[0].get("bytes_in") == 15 and udp[0].get("reason") == "idle_timeout_seconds"


async def test_max_bytes_and_timeout_end_a_tcp_connection(honeypot: Honeypot) -> None:
    hp = await honeypot(**services(session={"max_bytes": 2000, "timeout_seconds": 3}))
    port = hp.services.port("http")
    done = await run(["curl", "-sS", "--max-time", "20", "-o", "/dev/null", f"http://127.0.0.1:{port}/" + "a" * 4000])
    assert done.returncode != 0  # cut at 2000 bytes: the request never completes
    hits = await hp.wait_for(LIMIT_HIT, limit="max_bytes")
    assert hits[0].get("value") == 2000
    # A connection that says nothing is ended by timeout_seconds.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(15):
        assert await reader.read() == b""
    writer.close()
    await hp.wait_for(LIMIT_HIT, limit="timeout_seconds")


async def test_max_sessions_per_ip_counts_every_service_and_a_udp_flood_costs_nothing_else(honeypot: Honeypot) -> None:
    hp = await honeypot(**services(), limits={"max_sessions_per_ip": 2})
    port = hp.services.port("http")
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    await hp.wait_for(STREAM_OPEN, 2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    async with asyncio.timeout(10):
        assert await reader.read() == b""  # refused: closed at once
    writer.close()
    await hp.wait_for(LIMIT_HIT, limit="max_sessions_per_ip")
    for _, w in held:
        w.close()
    await hp.wait_for(SESSION_CLOSED, 3)
    # A UDP flood from many ports of one address: a few peers admitted, the rest refused, and HTTP still answers.
    socks = []
    for _ in range(50):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setblocking(False)
        socks.append(s)
        for _ in range(200):
            try:
                s.sendto(b"x" * 512, ("127.0.0.1", hp.services.port("echo")))
            except BlockingIOError:
                break
    await asyncio.sleep(1)
    page = await curl(port, "/after-flood")
    assert page
    for s in socks:
        s.close()


# A UDP echo service in the box on every address: it answers with the address and port it saw.
ECHO_ALL = (
    "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.bind(('0.0.0.0',7777))\n"
    "while True:\n d,a=s.recvfrom(65535)\n s.sendto(b'echo:'+d+b' from '+a[0].encode()+b':'+str(a[1]).encode(),a)\n"
)
UDP_CLIENT = (
    "import socket,sys\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\ns.settimeout(10)\n"
    "s.bind(('0.0.0.0',0))\ns.sendto(b'ping',(sys.argv[1],int(sys.argv[2])))\n"
    "print(s.recvfrom(65535)[0].decode(), s.getsockname()[1])\n"
)
# Holds a TCP connection to the fake HTTP open while the box's `ss` is read; prints its own source port.
TCP_HOLD = (
    "import socket,sys,time\nc=socket.create_connection((sys.argv[1],int(sys.argv[2])),10)\n"
    "print(c.getsockname()[1],flush=True)\nsys.stdin.readline()\n"
)


@pytest.mark.parametrize("mode", ["internal", "capture"])
async def test_services_in_the_box_see_a_client_off_loopback(honeypot: Honeypot, client_netns: str, mode: str) -> None:
    """A client at 198.51.100.2 (a namespace of the test's own, joined to the host by a veth pair): the box's nginx
    logs its address, ``ss`` in the box shows its TCP connection to eth0:80, and a UDP service there answers its
    own address and port, as on a server; packets only between the host, the test's namespace and the box."""
    listen = f"{NS_HOST}:0"
    hp = await honeypot(
        services=[
            {"name": "ssh", "protocol": "ssh", "listen": listen},
            {"name": "http", "protocol": "tcp", "listen": listen, "target_port": 80},
            {"name": "echo", "protocol": "udp", "listen": listen, "target_port": 7777},
        ],
        ssh={"listen": listen},
        sandbox={"session_transport": "init"},
        network={"mode": mode},
    )
    in_ns = ["ip", "netns", "exec", client_netns]
    ssh = [*in_ns, "sshpass", "-p", PASSWORD, "ssh", *client_options(), "-T", "-p", str(hp.port), f"{USER}@{NS_HOST}"]
    done = await run([*ssh, f'nohup python3 -c "{ECHO_ALL}" >/dev/null 2>&1 & sleep 1; echo started'])
    assert "started" in done.out, done.err
    http, echo = hp.services.port("http"), hp.services.port("echo")
    done = await run([*in_ns, "curl", "-sS", "--max-time", "20", f"http://{NS_HOST}:{http}/probe-off-loopback"])
    assert done.returncode == 0 and "nginx" in done.out, done.err
    done = await run([*in_ns, "python3", "-c", UDP_CLIENT, NS_HOST, str(echo)])
    reply, port = done.out.strip().rsplit(maxsplit=1)
    assert reply == f"echo:ping from {NS_CLIENT}:{port}", done.out + done.err
    async with started([*in_ns, "python3", "-c", TCP_HOLD, NS_HOST, str(http)]) as hold:
        assert hold.stdout is not None and hold.stdin is not None
        async with asyncio.timeout(20):
            src_port = int(await hold.stdout.readline())
        await hp.wait_for(STREAM_OPEN, 2)
        done = await run([*ssh, "grep probe-off-loopback /var/log/nginx/access.log; ss -Htn state established"])
        hold.stdin.write(b"\n")
        await hold.stdin.drain()
    assert done.out.startswith(f"{NS_CLIENT} - "), done.out  # nginx's log: the client's own address
    assert re.search(rf":80\s+{re.escape(NS_CLIENT)}:{src_port}\s", done.out + " "), done.out
