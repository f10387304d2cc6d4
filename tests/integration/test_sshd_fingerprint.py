"""sandtrap against Debian's real sshd, side by side: what a scanner sees before it logs in.

A raw socket client (no SSH library) reads each server's identification line and KEXINIT, and sends
the probes honeypot scanners use, and malformed key exchanges. Both servers must answer each alike,
byte for byte, and close alike: a reset (input left unread) is not a FIN. There is no list of known
differences: any difference fails the test. ``ssh/wire.py`` bends asyncssh's internals for this;
``tests/unit/ssh/test_asyncssh_internals.py`` fails first if an asyncssh upgrade moves them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import struct
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from sandtrap.config import DEFAULT_SSH_VERSION
from sandtrap.ssh.algorithms import ENCRYPTION_ALGS, HOST_KEY_ALGS, MAC_ALGS, OPENSSH_KEX_ALGS
from sandtrap.ssh.kex import KexInit, parse_kexinit

from sshd import RealSSHD, real_sshd

pytestmark = pytest.mark.timeout(180)

HOST = "127.0.0.1"
CLIENT_BANNER = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10\r\n"
IO_TIMEOUT_S = 10.0
PROBE_WAIT_S = 3.0  # how long a probe listens; real sshd's LoginGraceTime is 120 s, so "open" means open at 3 s
MSG_DISCONNECT = 1
MSG_UNIMPLEMENTED = 3
MSG_KEXINIT = 20
MSG_NEWKEYS = 21
MSG_KEX_DH_GEX_GROUP = 31  # also KEX_ECDH_REPLY: told apart by its shape (name_is_gex)
MSG_KEX_ECDH_INIT = 30

KEXINIT_FIELDS = ("kex", "host_key", "enc_cs", "enc_sc", "mac_cs", "mac_sc", "comp_cs", "comp_sc", "lang_cs", "lang_sc")

# -- the raw client ----------------------------------------------------------------------------


def name_list(names: Iterable[str]) -> bytes:
    raw = ",".join(names).encode("ascii")
    return struct.pack(">I", len(raw)) + raw


def plain_packet(payload: bytes) -> bytes:
    """An unencrypted binary packet (RFC 4253 §6), padded with zeros as OpenSSH does."""
    padding = -(5 + len(payload)) % 8
    if padding < 4:
        padding += 8
    return struct.pack(">IB", 1 + len(payload) + padding, padding) + payload + bytes(padding)


def client_kexinit(
    kex: Iterable[str] = ("curve25519-sha256", "ext-info-c", "kex-strict-c-v00@openssh.com"),
    host_key: Iterable[str] = ("ssh-ed25519", "rsa-sha2-512", "rsa-sha2-256"),
    enc: Iterable[str] = ("chacha20-poly1305@openssh.com", "aes128-ctr"),
    mac: Iterable[str] = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-256"),
) -> bytes:
    lists = (kex, host_key, enc, enc, mac, mac, ("none",), ("none",), (), ())
    payload = bytes([MSG_KEXINIT]) + os.urandom(16) + b"".join(name_list(x) for x in lists) + b"\0" + bytes(4)
    return plain_packet(payload)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(IO_TIMEOUT_S):
            await writer.wait_closed()


@dataclass(frozen=True)
class ServerKexInit:
    banner: bytes
    kexinit: KexInit
    first_kex_packet_follows: bool
    reserved: int
    padding: bytes

    def framing(self) -> dict[str, object]:
        return {
            "first_kex_packet_follows": self.first_kex_packet_follows,
            "reserved": self.reserved,
            "padding_is_zero": not any(self.padding),
        }


async def read_server_kexinit(port: int) -> ServerKexInit:
    """Exchange identification lines, then read the server's first binary packet: its KEXINIT."""
    reader, writer = await asyncio.open_connection(HOST, port)
    try:
        async with asyncio.timeout(IO_TIMEOUT_S):
            writer.write(CLIENT_BANNER)
            banner = await reader.readline()
            while not banner.startswith(b"SSH-"):  # RFC 4253 lets a server send other lines first
                if not banner:
                    raise AssertionError(f"port {port} closed before its identification line")
                banner = await reader.readline()
            length, padding_length = struct.unpack(">IB", await reader.readexactly(5))
            body = await reader.readexactly(length - 1)
    finally:
        await close(writer)
    payload, padding = body[: len(body) - padding_length], body[len(body) - padding_length :]
    assert payload[0] == MSG_KEXINIT, f"first packet is message {payload[0]}, not KEXINIT"
    first_follows, reserved = struct.unpack(">?I", payload[-5:])
    return ServerKexInit(banner, parse_kexinit(payload), first_follows, reserved, padding)


@dataclass(frozen=True)
class Reply:
    """What a server sent back to a probe, and whether it closed (FIN or RST) within the wait."""

    data: bytes
    closed: bool
    reset: bool
    after_s: float

    def summary(self, banner: bytes) -> tuple[str, ...]:
        return (*describe(self.data, banner), "reset" if self.reset else "closed" if self.closed else "open")


def describe(data: bytes, banner: bytes) -> list[str]:
    """Text lines and unencrypted packets, in order; random parts (cookie, padding) left out."""
    out: list[str] = []
    pos = 0
    while pos < len(data):
        if data[pos] != 0:  # plain packets start with a zero byte (length < 16 MiB); text never does
            end = data.find(b"\n", pos)
            end = len(data) if end < 0 else end + 1
            line = data[pos:end]
            text = line.rstrip(b"\r\n").decode("ascii", "replace")
            out.append("banner" if line == banner else f"text {text!r}")
            pos = end
            continue
        if len(data) - pos < 6:
            out.append(f"bytes {data[pos:]!r}")
            break
        length, padding = struct.unpack_from(">IB", data, pos)
        if pos + 4 + length > len(data):
            out.append(f"partial packet of {length} bytes")
            break
        payload = data[pos + 5 : pos + 4 + length - padding]
        pos += 4 + length
        if not payload:
            out.append("empty packet")
        elif payload[0] == MSG_DISCONNECT:
            (code,) = struct.unpack_from(">I", payload, 1)
            (n,) = struct.unpack_from(">I", payload, 5)
            reason = payload[9 : 9 + n].decode("utf-8", "replace")
            (m,) = struct.unpack_from(">I", payload, 9 + n)
            lang = payload[13 + n : 13 + n + m].decode("utf-8", "replace")
            out.append(f"DISCONNECT {code} {reason!r} {lang!r}")
        elif payload[0] == MSG_KEXINIT:
            out.append("KEXINIT")
        elif payload[0] == MSG_NEWKEYS:  # the rest is encrypted: its length (same cipher, same messages) only
            out += ["NEWKEYS", f"encrypted {len(data) - pos} bytes"]
            break
        elif payload[0] == MSG_KEX_DH_GEX_GROUP and name_is_gex(payload):
            (n,) = struct.unpack_from(">I", payload, 1)
            out.append(f"GEX group of {int.from_bytes(payload[5 : 5 + n], 'big').bit_length()} bits")
        elif payload[0] == MSG_UNIMPLEMENTED:
            out.append(f"UNIMPLEMENTED seq {struct.unpack_from('>I', payload, 1)[0]}")
        else:
            out.append(f"message {payload[0]}")
    return out


def name_is_gex(payload: bytes) -> bool:
    """A KEX_DH_GEX_GROUP is two mpints (p, then g = 2 or 5) and nothing else; a KEX_ECDH_REPLY is not."""
    (n,) = struct.unpack_from(">I", payload, 1)
    rest = payload[5 + n :]
    return len(rest) in (5, 6) and rest[:4] == b"\0\0\0\x01" and rest[4:] in (b"\x02", b"\x05")


async def probe(port: int, send: bytes, wait_s: float = PROBE_WAIT_S) -> Reply:
    """Send ``send`` at once, then collect what comes back until the server closes or ``wait_s`` passes."""
    started = time.monotonic()
    reader, writer = await asyncio.open_connection(HOST, port)
    data = bytearray()
    closed = reset = False
    try:
        if send:
            writer.write(send)
        try:
            async with asyncio.timeout(wait_s):
                await writer.drain()
                while chunk := await reader.read(65536):
                    data += chunk
                closed = True
        except (ConnectionResetError, BrokenPipeError):
            closed = reset = True
        except TimeoutError:
            pass
    finally:
        await close(writer)
    return Reply(bytes(data), closed, reset, round(time.monotonic() - started, 2))


def kex_ecdh_init(client_pub: bytes) -> bytes:
    """SSH_MSG_KEX_ECDH_INIT (30): the client's key of a curve25519 or sntrup761x25519 exchange."""
    return plain_packet(bytes([MSG_KEX_ECDH_INIT]) + struct.pack(">I", len(client_pub)) + client_pub)


def x25519_public() -> bytes:
    return X25519PrivateKey.generate().public_key().public_bytes_raw()


SNTRUP = "sntrup761x25519-sha512@openssh.com"
SNTRUP_PUBLIC_BYTES = 1158


def sntrup_client(kex_alg: str, client_pub: bytes) -> bytes:
    kexinit = client_kexinit(kex=(kex_alg, "ext-info-c", "kex-strict-c-v00@openssh.com"))
    return CLIENT_BANNER + kexinit + kex_ecdh_init(client_pub)


PROBES: dict[str, bytes] = {
    "no-banner": b"",
    "bad-version": b"SSH-1337-x\r\n",
    "ssh1-version": b"SSH-1.5-x\r\n",
    "blank-line-flood": b"\r\n" * 200 + CLIENT_BANNER,
    "doubled-banner": CLIENT_BANNER * 2,
    "http-request": b"GET / HTTP/1.0\r\n\r\n",
    "http-request-1.1": b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/7.88.1\r\nAccept: */*\r\n\r\n",
    "slash-lines": b"/\r\n" * 7,
    "one-bad-line-all-read": b"/\r\n",
    "cr-inside-line": b"SSH-2.0-x\ry\r\n",
    "nul-in-line": b"SSH-2.0-x\0y\r\nmore",
    "no-common-kex": CLIENT_BANNER + client_kexinit(kex=("diffie-hellman-group1-sha1",)),
    "sha1-rsa-host-key-only": CLIENT_BANNER + client_kexinit(host_key=("ssh-rsa",)),
    "aead-cipher-no-common-mac": CLIENT_BANNER
    + client_kexinit(enc=("chacha20-poly1305@openssh.com",), mac=("hmac-md5",)),
    "kexinit-flood": CLIENT_BANNER + client_kexinit() * 50,
    "kexinit-twice-no-strict": CLIENT_BANNER + client_kexinit(kex=("curve25519-sha256", "ext-info-c")) * 2,
    "curve25519-garbage-then-more": CLIENT_BANNER + client_kexinit() + kex_ecdh_init(os.urandom(32)) + os.urandom(64),
    "sntrup-zero-key": sntrup_client(SNTRUP, bytes(SNTRUP_PUBLIC_BYTES + 32)),
    "sntrup-truncated-key": sntrup_client(SNTRUP, os.urandom(SNTRUP_PUBLIC_BYTES - 1) + x25519_public()),
    "sntrup-oversized-key": sntrup_client(SNTRUP, os.urandom(SNTRUP_PUBLIC_BYTES + 1) + x25519_public()),
    "sntrup-empty-key": sntrup_client(SNTRUP, b""),
    "sntrup-pq-part-only": sntrup_client("sntrup761x25519-sha512", os.urandom(SNTRUP_PUBLIC_BYTES)),
    "sntrup-garbage-key": sntrup_client("sntrup761x25519-sha512", os.urandom(SNTRUP_PUBLIC_BYTES) + x25519_public()),
    "sntrup-init-before-kexinit": CLIENT_BANNER + kex_ecdh_init(os.urandom(SNTRUP_PUBLIC_BYTES + 32)),
}
# Many more cases, each compared the same way but all at once in one test (test_probe_matrix_matches_real_sshd).
MATRIX: dict[str, bytes] = {}
# Packets before encryption: sshd skips IGNORE/DEBUG/UNIMPLEMENTED unparsed, answers an unknown transport
# message with UNIMPLEMENTED, refuses types 0 and >= 192, and under strict kex refuses all it does not wait for.
for _type in (2, 4, 5, 20, 21, 31, 34, 50, 200):
    _body = plain_packet(bytes([_type]) + bytes(12))
    MATRIX[f"type-{_type}-first"] = CLIENT_BANNER + _body
    MATRIX[f"type-{_type}-after-kexinit"] = CLIENT_BANNER + client_kexinit() + _body
    MATRIX[f"type-{_type}-after-kexinit-no-strict"] = (
        CLIENT_BANNER + client_kexinit(kex=("curve25519-sha256", "ext-info-c")) + _body
    )
    MATRIX[f"type-{_type}-after-kex-init"] = (
        CLIENT_BANNER + client_kexinit(enc=("aes128-ctr",)) + kex_ecdh_init(x25519_public()) + _body
    )
# Group exchange: sshd's bounds (2048..8192 bits) and its choice of size; the old single-size request is unknown to it.
GEX_KEXINIT = client_kexinit(kex=("diffie-hellman-group-exchange-sha256", "ext-info-c", "kex-strict-c-v00@openssh.com"))
for _bits in ((512, 1024, 1536), (1024, 1024, 1024), (2048, 2048, 2048), (2048, 3072, 4096), (4096, 2048, 8192)):
    MATRIX[f"gex-request-{'-'.join(map(str, _bits))}"] = (
        CLIENT_BANNER + GEX_KEXINIT + plain_packet(bytes([34]) + struct.pack(">III", *_bits))
    )
MATRIX["gex-request-old"] = CLIENT_BANNER + GEX_KEXINIT + plain_packet(bytes([30]) + struct.pack(">I", 2048))
# sshd reads 8 KiB at a time after the identification line: a flood past that leaves input unread (reset).
for _size in (8192, 8200):
    _kexinit = client_kexinit()
    _count = _size // len(_kexinit)
    MATRIX[f"kexinit-flood-{_size}-bytes"] = CLIENT_BANNER + _kexinit * _count + bytes(_size - _count * len(_kexinit))
# Key exchange goes on wherever the client's lists meet the server's: each algorithm offered alone.
for _kex in OPENSSH_KEX_ALGS:
    MATRIX[f"only-kex-{_kex}"] = CLIENT_BANNER + client_kexinit(
        kex=(_kex, "ext-info-c", "kex-strict-c-v00@openssh.com")
    )
for _alg in HOST_KEY_ALGS:
    MATRIX[f"only-host-key-{_alg}"] = CLIENT_BANNER + client_kexinit(host_key=(_alg,))
for _enc in ENCRYPTION_ALGS:
    MATRIX[f"only-cipher-{_enc}"] = CLIENT_BANNER + client_kexinit(enc=(_enc,))
for _mac in MAC_ALGS:
    MATRIX[f"only-mac-{_mac}"] = CLIENT_BANNER + client_kexinit(enc=("aes128-ctr",), mac=(_mac,))

# -- fixtures ----------------------------------------------------------------------------------


@pytest.fixture
async def sshd(tmp_path: Path) -> AsyncIterator[RealSSHD]:
    async with real_sshd(tmp_path / "sshd") as server:
        yield server


@pytest.fixture
async def sandtrap_port(honeypot: Callable[..., Any]) -> int:
    hp = await honeypot(sandbox={"pool_size": 0})  # nothing here logs in: no sandbox needed
    assert hp.settings.ssh.version == DEFAULT_SSH_VERSION
    return int(hp.port)


# -- tests -------------------------------------------------------------------------------------


async def test_identification_string_is_real_sshds(sshd: RealSSHD, sandtrap_port: int) -> None:
    real, ours = await asyncio.gather(probe(sshd.port, b"", 1.0), probe(sandtrap_port, b"", 1.0))
    real_line = real.data.split(b"\n", 1)[0] + b"\n"
    assert real_line == (DEFAULT_SSH_VERSION + "\r\n").encode(), "config.DEFAULT_SSH_VERSION is not the host's sshd"
    assert ours.data == real.data == real_line, "both send their identification line and nothing more"
    assert not real.closed and not ours.closed


async def test_kexinit_lists_match_real_sshd(sshd: RealSSHD, sandtrap_port: int) -> None:
    real, ours = await asyncio.gather(read_server_kexinit(sshd.port), read_server_kexinit(sandtrap_port))
    for field in KEXINIT_FIELDS:
        assert getattr(ours.kexinit, field) == getattr(real.kexinit, field), field
    assert ours.kexinit.hassh_server == real.kexinit.hassh_server
    assert real.kexinit.kex[:2] == ["sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com"]


async def test_kexinit_packet_framing(sshd: RealSSHD, sandtrap_port: int) -> None:
    real, ours = await asyncio.gather(read_server_kexinit(sshd.port), read_server_kexinit(sandtrap_port))
    assert 4 <= len(ours.padding) < 4 + 8 and 4 <= len(real.padding) < 4 + 8
    assert ours.framing() == real.framing()


async def keyscan(port: int) -> set[str]:
    """The host key types ``ssh-keyscan`` gets, one full key exchange per type."""
    proc = await asyncio.create_subprocess_exec(
        "ssh-keyscan",
        "-T",
        "5",
        "-p",
        str(port),
        "-t",
        "rsa,ecdsa,ed25519,dsa",
        HOST,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    async with asyncio.timeout(30):
        out, _ = await proc.communicate()
    return {line.split()[1] for line in out.decode().splitlines() if line and not line.startswith("#")}


async def test_host_key_types_offered(sshd: RealSSHD, sandtrap_port: int) -> None:
    real, ours = await asyncio.gather(keyscan(sshd.port), keyscan(sandtrap_port))
    assert real == {"ssh-rsa", "ecdsa-sha2-nistp256", "ssh-ed25519"}
    assert ours == real


def record(output_dir: Path, name: str, sent: bytes, replies: dict[str, Reply], banner: bytes) -> None:
    """Keep what each server sent back to a probe in test-output/, for README and for whoever debugs."""
    lines = [f"probe {name}: sent {sent[:200]!r}"]
    for server, reply in replies.items():
        how = "reset" if reply.reset else "closed" if reply.closed else "open"
        lines += [f"{server}: {how} after {reply.after_s}s, {reply.summary(banner)}", f"  bytes {reply.data!r}"]
    folder = output_dir / "sshd-fingerprint"
    folder.mkdir(exist_ok=True)
    (folder / f"probe-{name}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


async def compare(name: str, sent: bytes, real_port: int, our_port: int, output_dir: Path) -> str | None:
    """Send ``sent`` to both servers at once; None if they answer alike, else what differs."""
    real, ours = await asyncio.gather(probe(real_port, sent), probe(our_port, sent))
    banner = (DEFAULT_SSH_VERSION + "\r\n").encode()
    record(output_dir, name, sent, {"real sshd": real, "sandtrap": ours}, banner)
    got = (real.summary(banner), ours.summary(banner))
    # sshd writes without TCP_NODELAY: now and then Nagle holds its last small write back until the close,
    # and the reset drops it. A reply cut that way is sshd's too: it must be a prefix of ours.
    cut_by_reset = real.reset and ours.reset and got[1][: len(got[0]) - 1] == got[0][:-1]
    if got[1] != got[0] and not cut_by_reset:
        return f"{name}: sandtrap answers unlike sshd (real, sandtrap): {got}"
    # The same race with sshd's error text and its CR LF, written in two writes.
    real_data = real.data.removesuffix(b"\r\n") if real.reset else real.data
    our_data = ours.data.removesuffix(b"\r\n") if ours.reset else ours.data
    if all(part.startswith(("banner", "text")) for part in got[0][:-1]) and our_data != real_data:
        return f"{name}: same lines, different bytes: {real.data!r} {ours.data!r}"  # packets carry random cookies
    for reply in (real, ours):
        assert reply.closed or reply.after_s >= PROBE_WAIT_S
    return None


@pytest.mark.parametrize("name", list(PROBES))
async def test_probe_answers_match_real_sshd(name: str, sshd: RealSSHD, sandtrap_port: int, output_dir: Path) -> None:
    difference = await compare(name, PROBES[name], sshd.port, sandtrap_port, output_dir)
    assert difference is None, difference


async def test_probe_matrix_matches_real_sshd(sshd: RealSSHD, sandtrap_port: int, output_dir: Path) -> None:
    """Every algorithm offered alone, every packet type in every kex state, floods: all alike, reset included."""
    slots = asyncio.Semaphore(4)  # within sandtrap's 5 connections per address, and sshd unhurried

    async def one(name: str) -> str | None:
        async with slots:
            return await compare(name, MATRIX[name], sshd.port, sandtrap_port, output_dir)

    results = await asyncio.gather(*(one(name) for name in MATRIX))
    differences = [r for r in results if r is not None]
    assert not differences, "\n".join(differences)
    assert len(MATRIX) > 60


async def test_login_grace_time_expiry_matches_real_sshd(tmp_path: Path, honeypot: Callable[..., Any]) -> None:
    """A client that never identifies itself: both wait LoginGraceTime, then close without a word."""
    hp = await honeypot(sandbox={"pool_size": 0}, ssh={"login_grace_time_s": 2})
    async with real_sshd(tmp_path / "sshd", extra_config="LoginGraceTime 2") as sshd:
        real, ours = await asyncio.gather(probe(sshd.port, b"", 8.0), probe(hp.port, b"", 8.0))
    banner = (DEFAULT_SSH_VERSION + "\r\n").encode()
    assert real.summary(banner) == ours.summary(banner) == ("banner", "closed")
    assert 1.5 <= real.after_s < 4 and 1.5 <= ours.after_s < 4, (real.after_s, ours.after_s)


async def openssh_client_log(port: int) -> dict[str, str]:
    """Run OpenSSH's client up to authentication; keep what its debug log says about the server."""
    proc = await asyncio.create_subprocess_exec(
        "ssh",
        "-vvv",
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "IdentityFile=/dev/null",
        "-o",
        "IdentityAgent=none",
        "-p",
        str(port),
        f"nobody@{HOST}",
        "true",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    found: dict[str, str] = {}
    ext_info: list[str] = []
    for line in err.decode(errors="replace").splitlines():
        if m := re.match(r"debug1: kex: (algorithm|host key algorithm): (.*)", line):
            found[m.group(1)] = m.group(2)
        elif m := re.match(r"debug1: kex_input_ext_info: (.*)", line):
            ext_info.append(m.group(1))
        elif m := re.match(r"debug1: Authentications that can continue: (.*)", line):
            found.setdefault("auth methods", m.group(1))
    found["ext_info"] = "; ".join(ext_info)
    return found


async def test_openssh_client_sees_the_same_server(sshd: RealSSHD, sandtrap_port: int) -> None:
    real, ours = await asyncio.gather(openssh_client_log(sshd.port), openssh_client_log(sandtrap_port))
    assert set(real) == {"algorithm", "host key algorithm", "ext_info", "auth methods"}, real
    assert real["algorithm"] == "sntrup761x25519-sha512"
    assert "publickey-hostbound@openssh.com=<0>" in real["ext_info"]
    assert ours == real


async def command(*argv: str, timeout_s: float = 120.0) -> str:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    async with asyncio.timeout(timeout_s):
        out, _ = await proc.communicate()
    return out.decode("utf-8", "replace")


SSH_AUDIT = Path(sys.executable).with_name("ssh-audit")


@pytest.mark.skipif(not SSH_AUDIT.exists(), reason="ssh-audit (dev extras) not installed")
async def test_ssh_audit_policy_made_from_real_sshd_passes(sshd: RealSSHD, sandtrap_port: int, tmp_path: Path) -> None:
    """ssh-audit -M on the real sshd, -P on sandtrap: algorithms, host keys, key sizes, GEX modulus sizes."""
    policy = tmp_path / "policy.txt"
    made = await command(str(SSH_AUDIT), "-M", str(policy), "-p", str(sshd.port), HOST)
    assert policy.exists(), made
    text = policy.read_text(encoding="utf-8")
    assert "sntrup761x25519-sha512" in text and "dh_modulus_sizes" in text, text
    real = await command(str(SSH_AUDIT), "-P", str(policy), "-p", str(sshd.port), HOST)
    ours = await command(str(SSH_AUDIT), "-P", str(policy), "-p", str(sandtrap_port), HOST)
    assert "Passed" in real, real
    assert "Passed" in ours and "Failed" not in ours, ours


@pytest.mark.skipif(shutil.which("nmap") is None, reason="nmap not installed (scripts/setup.sh test packages)")
async def test_nmap_ssh2_enum_algos_output_is_identical(sshd: RealSSHD, sandtrap_port: int) -> None:
    """nmap -sV with ssh2-enum-algos and ssh-hostkey: service line, algorithm lists, host key types and sizes."""

    async def scan(port: int) -> dict[str, list[str]]:
        """The service line and each script's lines (nmap prints the scripts in either order)."""
        out = await command(
            "nmap", "-Pn", "-n", "-sV", "-p", str(port), "--script", "ssh2-enum-algos,ssh-hostkey", HOST
        )
        lines = out[out.index("PORT ") :].splitlines()
        found = {"service": [next(line.split(None, 1)[1] for line in lines if line.startswith(f"{port}/tcp"))]}
        script = ""
        for line in lines:
            if m := re.match(r"\| ([\w-]+):", line):
                script = m.group(1)
            if script and line.startswith(("|", "|_")):  # host keys: type and size, not fingerprints
                found.setdefault(script, []).append(re.sub(r"[0-9a-f]{32}", "<fingerprint>", line))
            if line.startswith("|_"):
                script = ""
        return found

    real, ours = await asyncio.gather(scan(sshd.port), scan(sandtrap_port))
    assert any("sntrup761x25519-sha512@openssh.com" in line for line in real["ssh2-enum-algos"]), real
    assert real["service"][0].startswith("open  ssh     OpenSSH 9.2p1 Debian"), real
    assert "ssh-hostkey" in real
    assert ours == real
