"""The capture gateway's pure parts: names and answers, the DNS bucket, the fetcher's policy, the pcap format,
the namespace's rules."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import ssl
import struct
from pathlib import Path

import pytest
from dnslib import QTYPE, RCODE, DNSRecord

from sandtrap.config import EgressSettings, NetworkSettings, load_settings
from sandtrap.errors import ConfigError
from sandtrap.network import dns, ftp, tftp
from sandtrap.network.fetcher import Policy, Refused, is_own
from sandtrap.network.namespace import CATCH_PORT, rules
from sandtrap.network.pcap import file_header, record
from sandtrap.network.streams import not_found, response
from sandtrap.network.taps import DataChannel
from sandtrap.network.tls import SensorCA

ANSWERS = ipaddress.IPv4Network("198.18.0.0/15")


def test_names_that_could_exist_and_those_that_could_not() -> None:
    for name in ("example.com", "a.b.c.example.org", "cdn.example.de", "xn--bcher-kva.example", "x_y.example.io"):
        assert dns.could_exist(name) or name.endswith(".example"), name
    for name in ("localhost", "nothing", "a..b.com", "-a.com", "a" * 64 + ".com", "host.corp.internal", "x.local"):
        assert not dns.could_exist(name), name
    assert not dns.could_exist("a." * 127 + "com")


def test_one_box_sees_one_address_per_name_and_two_boxes_differ() -> None:
    one, two = dns.Names((ANSWERS,), b"k" * 32), dns.Names((ANSWERS,), b"j" * 32)
    first = one.address("Payload.Example.COM.")
    assert first == one.address("payload.example.com") and ipaddress.ip_address(first) in ANSWERS
    assert one.reverse[first] == "payload.example.com"
    assert len({one.address(f"h{i}.example.com") for i in range(500)}) == 500  # no two names share one
    assert any(one.address(f"h{i}.example.com") != two.address(f"h{i}.example.com") for i in range(5))


def query(name: str, qtype: str = "A") -> bytes:
    return bytes(DNSRecord.question(name, qtype).pack())


def test_answers_nxdomain_and_malformed_datagrams() -> None:
    names = dns.Names((ANSWERS,), b"k" * 32)
    a = dns.answer(query("c2.example.com"), names)
    assert a is not None and a.rcode == "NOERROR" and a.address == names.address("c2.example.com")
    parsed = DNSRecord.parse(a.reply)
    assert str(parsed.rr[0].rdata) == a.address and parsed.rr[0].rtype == QTYPE.A
    nx = dns.answer(query("nothing.invalidtld"), names)
    assert nx is not None and DNSRecord.parse(nx.reply).header.rcode == RCODE.NXDOMAIN
    aaaa = dns.answer(query("c2.example.com", "AAAA"), names)
    assert aaaa is not None and DNSRecord.parse(aaaa.reply).rr == []
    for junk in (b"", b"\x00" * 5, b"\xff" * 600, b"\x00" * 4000):
        assert dns.answer(junk, names) is None


def test_the_bucket_lets_a_burst_and_a_rate_through() -> None:
    bucket = dns.Bucket(rate=5, burst=10)
    assert sum(bucket.take(100.0) for _ in range(50)) == 10
    assert sum(bucket.take(101.0) for _ in range(50)) == 5
    assert bucket.dropped == 85


def test_the_fetchers_policy_refuses_private_loopback_and_link_local_unless_allowed() -> None:
    policy = Policy(EgressSettings())
    for address in ("127.0.0.1", "10.1.2.3", "192.168.1.1", "172.16.0.1", "169.254.169.254", "::1", "fe80::1",
                    "0.0.0.0", "224.0.0.1", "100.64.0.1", "198.18.0.1"):  # fmt: skip
        assert not policy.permits(address), address
    assert policy.permits("93.184.215.14")
    assert Policy(EgressSettings(allow=["127.0.0.1/32"])).permits("127.0.0.1")
    assert not Policy(EgressSettings(allow=["127.0.0.1/32"])).permits("127.0.0.2")
    # The sensor's own addresses are not the internet (told by bind: no packet is sent).
    assert is_own("127.0.0.1") and not is_own("192.0.2.1") and not is_own("93.184.215.14")


async def test_a_name_is_resolved_by_hosts_first_and_refused_by_its_address() -> None:
    policy = Policy(EgressSettings(hosts={"Evil.Example.com": "10.0.0.5", "ok.example.com": "127.0.0.1"},
                                   allow=["127.0.0.1/32"]))  # fmt: skip
    assert await policy.resolve("OK.example.com.") == ["127.0.0.1"]
    with pytest.raises(Refused, match=r"10\.0\.0\.5"):
        await policy.resolve("evil.example.com")
    with pytest.raises(Refused):
        await policy.resolve("169.254.169.254")


def test_pcap_headers_are_libpcaps() -> None:
    assert file_header(2048) == struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 2048, 1)
    rec = record(b"abc", 60, 1.5)
    assert struct.unpack("<IIII", rec[:16]) == (1, 500000, 3, 60) and rec[16:] == b"abc"


def test_the_namespace_forwards_nothing_and_redirects_every_tcp_connection() -> None:
    lines = [" ".join(r) for r in rules("10.20.1.0/24")]
    assert lines[0] == "-P FORWARD DROP"
    assert f"-t nat -A PREROUTING -i sg+ -p tcp -j REDIRECT --to-ports {CATCH_PORT}" in lines
    assert not any(word in line for line in lines for word in ("MASQUERADE", "SNAT", "DNAT", "ACCEPT -o"))


def test_the_sinkhole_looks_like_nginx() -> None:
    head, _, body = response(404, "Not Found", not_found("nginx"), "nginx", "text/html").partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\n") and b"<center>nginx</center>" in body
    assert f"Content-Length: {len(body)}".encode() in head


def test_network_settings_bounds() -> None:
    assert NetworkSettings().egress.fetch is False and NetworkSettings().egress.allow == []
    with pytest.raises(ConfigError, match=r"network\.egress\.hosts"):
        load_settings(None, {"network": {"egress": {"hosts": {"a.example.com": "not-an-ip"}}}})
    with pytest.raises(ConfigError, match=r"network\.dns\.answer_subnet"):
        load_settings(None, {"network": {"dns": {"answer_subnet": "198.18.0.0/30"}}})
    s = load_settings(None, {"network": {"mode": "capture", "subnet": "10.30.0.0/24"}})
    assert (s.sandbox.network, s.sandbox.network_subnet) == ("capture", "10.30.0.0/24")


def test_tftp_requests_are_parsed_and_junk_is_not() -> None:
    assert tftp.parse(b"\x00\x01mips.bin\x00octet\x00tsize\x000\x00") == (tftp.RRQ, "mips.bin", "octet")
    assert tftp.parse(b"\x00\x02up\x00NETASCII\x00") == (tftp.WRQ, "up", "netascii")
    for junk in (b"", b"\x00\x01", b"\x00\x03data", b"\x00\x01noterminator", b"\x00\x01" + b"a" * 2000):
        assert tftp.parse(junk) is None
    assert tftp.error_packet(1, "File not found") == b"\x00\x05\x00\x01File not found\x00"


class Sent:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data.extend(data)

    async def drain(self) -> None:
        return None

    def close(self) -> None:
        self.closed = True


async def test_ftp_answers_as_vsftpd_and_asks_for_each_path_once() -> None:
    reader = asyncio.StreamReader()
    for line in (b"USER bot\r\n", b"PASS x\r\n", b"CWD bins\r\n", b"EPSV\r\n", b"SIZE x86\r\n", b"RETR x86\r\n",
                 b"PASV\r\n", b"SIZE ok\r\n", b"RETR ok\r\n", b"STOR up\r\n", b"QUIT\r\n"):  # fmt: skip
        reader.feed_data(line)
    reader.feed_eof()
    control, data = Sent(), Sent()
    asked: list[tuple[str, str, str]] = []
    stored: list[tuple[str, str, str]] = []
    ports: list[int] = []

    async def retrieve(user: str, password: str, path: str) -> bytes | None:
        asked.append((user, password, path))
        return b"payload" if path == "/bins/ok" else None

    def passive(port: int) -> asyncio.Future[DataChannel]:
        ports.append(port)
        future: asyncio.Future[DataChannel] = asyncio.get_running_loop().create_future()
        future.set_result(DataChannel(asyncio.StreamReader(), data))
        return future

    count = await ftp.serve(
        reader, control, "198.18.6.6", lambda: 40000, passive, retrieve, lambda *r: stored.append(r)
    )  # type: ignore[arg-type]
    assert count == 11 and asked == [("bot", "x", "/bins/x86"), ("bot", "x", "/bins/ok")]
    assert stored == [("bot", "STOR", "/bins/up")] and ports == [40000, 40000]
    text = control.data.decode()
    assert text.startswith("220 (vsFTPd 3.0.3)\r\n331 ") and "229 Entering Extended Passive Mode (|||40000|)" in text
    assert "550 Failed to open file." in text and "(198,18,6,6,156,64)" in text and text.endswith("221 Goodbye.\r\n")
    assert "213 7\r\n150 Opening BINARY mode data connection for ok (7 bytes).\r\n226 Transfer complete." in text
    assert data.data == b"payload" and data.closed


def test_port_and_eprt_name_only_the_box_itself() -> None:
    box = "10.99.0.2"
    assert ftp.active_port("PORT", "10,99,0,2,156,64", box) == 40000
    assert ftp.active_port("EPRT", "|1|10.99.0.2|40001|", box) == 40001
    assert ftp.active_port("EPRT", "!1!10.99.0.2!40001!", box) == 40001  # any delimiter (RFC 2428)
    for command, argument in (
        ("PORT", "127,0,0,1,0,22"),  # a bounce: another address, the host's own ports
        ("PORT", "10,99,0,3,156,64"),  # another box
        ("PORT", "10,99,0,2,0,0"),  # port 0
        ("PORT", "10,99,0,2,256,1"),
        ("PORT", "10,99,0,2,1"),
        ("PORT", "a,b,c,d,e,f"),
        ("EPRT", "|1|198.18.0.1|80|"),
        ("EPRT", "|1|10.99.0.2|99999|"),
        ("EPRT", "|1|10.99.0.2|"),
        ("EPRT", ""),
    ):
        assert isinstance(ftp.active_port(command, argument, box), str), (command, argument)
    assert ftp.active_port("EPRT", "|2|::1|80|", box) == "522 Bad network protocol.\r\n"


async def test_ftp_active_mode_connects_to_the_box_once_per_port_and_refuses_a_bounce() -> None:
    reader = asyncio.StreamReader()
    for line in (b"USER bot\r\n", b"PASS x\r\n", b"PORT 127,0,0,1,0,22\r\n", b"RETR ok\r\n",
                 b"PORT 10,99,0,2,156,64\r\n", b"RETR ok\r\n", b"RETR ok\r\n", b"EPRT |1|10.99.0.2|40001|\r\n",
                 b"LIST\r\n", b"QUIT\r\n"):  # fmt: skip
        reader.feed_data(line)
    reader.feed_eof()
    control, data, listing = Sent(), Sent(), Sent()
    connected: list[int] = []

    async def connect(port: int) -> DataChannel:
        connected.append(port)
        return DataChannel(asyncio.StreamReader(), data if len(connected) == 1 else listing)  # type: ignore[arg-type]

    async def retrieve(user: str, password: str, path: str) -> bytes | None:
        return b"payload"

    def passive(port: int) -> asyncio.Future[DataChannel]:
        raise AssertionError("no passive mode asked")

    await ftp.serve(
        reader, control, "198.18.6.6", lambda: 40000, passive, retrieve, lambda *r: None, "10.99.0.2", connect
    )  # type: ignore[arg-type]
    text = control.data.decode()
    assert connected == [40000, 40001]  # the bounce never connected; one connection per PORT
    assert text.count("500 Illegal PORT command.") == 1 and text.count("200 PORT command successful") == 1
    assert text.count("226 Transfer complete.") == 1 and "425 Use PORT or PASV first." in text  # the 2nd RETR
    assert "150 Here comes the directory listing.\r\n226 Directory send OK." in text
    assert data.data == b"payload" and data.closed and listing.closed and listing.data == b""


def test_the_sensor_ca_signs_a_leaf_per_name_that_verifies_and_is_kept(tmp_path: Path) -> None:
    ca = SensorCA(tmp_path / "network")
    assert (tmp_path / "network" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert SensorCA(tmp_path / "network").pem == ca.pem  # made once, then read
    files = ca.box_files()
    assert set(files) == {"usr/local/share/ca-certificates/internal-root-ca.crt", "etc/ssl/certs/ca-certificates.crt"}
    assert files["etc/ssl/certs/ca-certificates.crt"][0].endswith(ca.pem)
    assert not any(
        b"sandtrap" in name.encode() + data for name, (data, _, _) in files.items() if name.startswith("usr")
    )
    assert ca.context_for("c2.example.com") is ca.context_for("C2.example.com.")
    client = ssl.create_default_context(cadata=ca.pem.decode())
    server_ctx, _ = ca.server_context("198.18.0.9")
    a, b = ssl.MemoryBIO(), ssl.MemoryBIO()
    c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = server_ctx.wrap_bio(a, b, server_side=True)
    cl = client.wrap_bio(c_in, c_out, server_hostname="c2.example.com")
    for _ in range(10):  # the handshake, by hand: the client verifies the leaf against the CA alone
        for obj in (cl, server):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        a.write(c_out.read())
        c_in.write(b.read())
    assert cl.getpeercert()["subject"] == ((("commonName", "c2.example.com"),),)
