"""KEXINIT parsing and HASSH, checked against values the HASSH project itself published.

Every reference pair below (algorithm string -> md5) is copied from salesforce/hassh:

* README.md, "Example 1: Client Fingerprinting" (commit 12202d4da99aa04cf721bc768efbb8fe2e01f015):
  Cyberduck 6.7.1's hasshAlgorithms and its hassh ``8a8ae540028bf433cd68356c1b9e8d5b``.
* python/README.md, "Usage" (commit 2312681c429e2cfa7f9fe518294f6f17379da062): a live capture of
  SSH-2.0-libssh2_1.7.0 (client HASSH ``a7a87fbe86774c2e40cc4a7ea2ab1b3c``) against
  SSH-2.0-OpenSSH_7.2p2 Ubuntu-4ubuntu2.4 (server HASSH ``d43d91bc39d5aaed819ad9f6b57b7348``).
* python/hasshGen/hassh_fingerprints.csv (commit 44f1d6f76672fb0282317cc9819915c5d096d810): the row for
  SSH-2.0-OpenSSH_7.8p1 Debian-1 (debian sid-slim), hassh ``ec7378c1a92f5a8dde7e8b7a1ddf33d1``.
"""

from __future__ import annotations

import random
import struct

import pytest

from sandtrap.events import CATALOGUE, CLIENT_KEX
from sandtrap.ssh.kex import MSG_KEXINIT, kex_event_fields, parse_kexinit

# -- the published references ------------------------------------------------------------------

CYBERDUCK_HASSH = "8a8ae540028bf433cd68356c1b9e8d5b"
CYBERDUCK_ALGORITHMS = (
    "curve25519-sha256@libssh.org,diffie-hellman-group-exchange-sha256,ecdh-sha2-nistp521,ecdh-sha2-nistp384,"
    "ecdh-sha2-nistp256,diffie-hellman-group-exchange-sha1,diffie-hellman-group1-sha1,diffie-hellman-group14-sha1,"
    "diffie-hellman-group14-sha256,diffie-hellman-group15-sha512,diffie-hellman-group16-sha512,"
    "diffie-hellman-group17-sha512,diffie-hellman-group18-sha512,diffie-hellman-group14-sha256@ssh.com,"
    "diffie-hellman-group15-sha256,diffie-hellman-group15-sha256@ssh.com,diffie-hellman-group15-sha384@ssh.com,"
    "diffie-hellman-group16-sha256,diffie-hellman-group16-sha384@ssh.com,diffie-hellman-group16-sha512@ssh.com,"
    "diffie-hellman-group18-sha512@ssh.com;"
    "aes128-cbc,aes128-ctr,aes192-cbc,aes192-ctr,aes256-cbc,aes256-ctr,blowfish-cbc,blowfish-ctr,cast128-cbc,"
    "cast128-ctr,idea-cbc,idea-ctr,serpent128-cbc,serpent128-ctr,serpent192-cbc,serpent192-ctr,serpent256-cbc,"
    "serpent256-ctr,3des-cbc,3des-ctr,twofish128-cbc,twofish128-ctr,twofish192-cbc,twofish192-ctr,twofish256-cbc,"
    "twofish256-ctr,twofish-cbc,arcfour,arcfour128,arcfour256;"
    "hmac-sha1,hmac-sha1-96,hmac-md5,hmac-md5-96,hmac-sha2-256,hmac-sha2-512;"
    "zlib@openssh.com,zlib,none"
)

LIBSSH2_HASSH = "a7a87fbe86774c2e40cc4a7ea2ab1b3c"
LIBSSH2_ALGORITHMS = (
    "diffie-hellman-group-exchange-sha256,diffie-hellman-group-exchange-sha1,diffie-hellman-group14-sha1,"
    "diffie-hellman-group1-sha1;"
    "aes128-ctr,aes192-ctr,aes256-ctr,aes256-cbc,rijndael-cbc@lysator.liu.se,aes192-cbc,aes128-cbc,blowfish-cbc,"
    "arcfour128,arcfour,cast128-cbc,3des-cbc;"
    "hmac-sha2-256,hmac-sha2-512,hmac-sha1,hmac-sha1-96,hmac-md5,hmac-md5-96,hmac-ripemd160,"
    "hmac-ripemd160@openssh.com;"
    "none"
)

OPENSSH_78_HASSH = "ec7378c1a92f5a8dde7e8b7a1ddf33d1"
OPENSSH_78_ALGORITHMS = (
    "curve25519-sha256,curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521,"
    "diffie-hellman-group-exchange-sha256,diffie-hellman-group16-sha512,diffie-hellman-group18-sha512,"
    "diffie-hellman-group14-sha256,diffie-hellman-group14-sha1,ext-info-c;"
    "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com;"
    "umac-64-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,"
    "hmac-sha1-etm@openssh.com,umac-64@openssh.com,umac-128@openssh.com,hmac-sha2-256,hmac-sha2-512,hmac-sha1;"
    "none,zlib@openssh.com,zlib"
)

OPENSSH_72_SERVER_HASSH = "d43d91bc39d5aaed819ad9f6b57b7348"
OPENSSH_72_SERVER_ALGORITHMS = (
    "curve25519-sha256@libssh.org,ecdh-sha2-nistp256,ecdh-sha2-nistp384,ecdh-sha2-nistp521,"
    "diffie-hellman-group-exchange-sha256,diffie-hellman-group14-sha1;"
    "chacha20-poly1305@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr,aes128-gcm@openssh.com,aes256-gcm@openssh.com;"
    "umac-64-etm@openssh.com,umac-128-etm@openssh.com,hmac-sha2-256-etm@openssh.com,hmac-sha2-512-etm@openssh.com,"
    "hmac-sha1-etm@openssh.com,umac-64@openssh.com,umac-128@openssh.com,hmac-sha2-256,hmac-sha2-512,hmac-sha1;"
    "none,zlib@openssh.com"
)

# -- building KEXINIT payloads by hand (RFC 4253, section 7.1) ----------------------------------

COOKIE = bytes(range(0x30, 0x40))  # does not start with MSG_KEXINIT (20)
DECOY = ["decoy-should-not-be-hashed"]


def name_list(names: list[str]) -> bytes:
    raw = ",".join(names).encode("ascii")
    return struct.pack(">I", len(raw)) + raw


def kexinit(
    kex: list[str],
    enc_cs: list[str],
    mac_cs: list[str],
    comp_cs: list[str],
    *,
    host_key: list[str] | None = None,
    enc_sc: list[str] | None = None,
    mac_sc: list[str] | None = None,
    comp_sc: list[str] | None = None,
    lang_cs: list[str] | None = None,
    lang_sc: list[str] | None = None,
    cookie: bytes = COOKIE,
    msg_type: bool = True,
) -> bytes:
    """A KEXINIT payload; the server-to-client lists default to decoys so a mix-up shows."""
    lists = [
        kex,
        host_key if host_key is not None else ["ssh-ed25519", "rsa-sha2-512"],
        enc_cs,
        enc_sc if enc_sc is not None else DECOY,
        mac_cs,
        mac_sc if mac_sc is not None else DECOY,
        comp_cs,
        comp_sc if comp_sc is not None else DECOY,
        lang_cs or [],
        lang_sc or [],
    ]
    body = cookie + b"".join(name_list(x) for x in lists) + b"\x00" + struct.pack(">I", 0)
    return (bytes([MSG_KEXINIT]) if msg_type else b"") + body


def from_algorithms(algorithms: str, **kw: object) -> bytes:
    kex, enc, mac, comp = (part.split(",") for part in algorithms.split(";"))
    return kexinit(kex, enc, mac, comp, **kw)  # type: ignore[arg-type]


# -- HASSH against the references ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("algorithms", "expected"),
    [
        (CYBERDUCK_ALGORITHMS, CYBERDUCK_HASSH),
        (LIBSSH2_ALGORITHMS, LIBSSH2_HASSH),
        (OPENSSH_78_ALGORITHMS, OPENSSH_78_HASSH),
    ],
    ids=["cyberduck-6.7.1", "libssh2-1.7.0", "openssh-7.8p1-debian"],
)
def test_client_hassh_matches_published_value(algorithms: str, expected: str) -> None:
    k = parse_kexinit(from_algorithms(algorithms))
    assert k.hassh_algorithms == algorithms
    assert k.hassh == expected


def test_server_hassh_uses_the_server_to_client_lists() -> None:
    kex, enc, mac, comp = (part.split(",") for part in OPENSSH_72_SERVER_ALGORITHMS.split(";"))
    # Client-to-server lists differ from server-to-client ones: only the latter make hasshServer.
    payload = kexinit(kex, ["aes128-cbc"], ["hmac-md5"], ["zlib"], enc_sc=enc, mac_sc=mac, comp_sc=comp)
    k = parse_kexinit(payload)
    assert k.hassh_server_algorithms == OPENSSH_72_SERVER_ALGORITHMS
    assert k.hassh_server == OPENSSH_72_SERVER_HASSH
    assert k.hassh_algorithms == ";".join([",".join(kex), "aes128-cbc", "hmac-md5", "zlib"])
    assert k.hassh != OPENSSH_72_SERVER_HASSH


def test_every_list_lands_in_its_field() -> None:
    payload = kexinit(
        ["k1", "k2"],
        ["ecs"],
        ["mcs1", "mcs2"],
        ["ccs"],
        host_key=["hk"],
        enc_sc=["esc"],
        mac_sc=["msc"],
        comp_sc=["csc1", "csc2"],
        lang_cs=["en-US"],
        lang_sc=["de-DE", "fr"],
    )
    k = parse_kexinit(payload)
    assert (k.kex, k.host_key, k.enc_cs, k.enc_sc) == (["k1", "k2"], ["hk"], ["ecs"], ["esc"])
    assert (k.mac_cs, k.mac_sc, k.comp_cs, k.comp_sc) == (["mcs1", "mcs2"], ["msc"], ["ccs"], ["csc1", "csc2"])
    assert (k.lang_cs, k.lang_sc) == (["en-US"], ["de-DE", "fr"])


def test_empty_name_lists_are_empty_not_one_empty_name() -> None:
    k = parse_kexinit(kexinit(["curve25519-sha256"], ["aes128-ctr"], [], ["none"]))
    assert k.mac_cs == [] and k.lang_cs == [] and k.lang_sc == []
    assert k.hassh_algorithms == "curve25519-sha256;aes128-ctr;;none"


def test_payload_without_message_type_byte_is_refused() -> None:
    # asyncssh keeps the payload with its type byte; guessing it from the first byte would misparse
    # the 1 in 256 cookies that start with 20, so the parser insists on it.
    with pytest.raises(ValueError, match="not a KEXINIT"):
        parse_kexinit(from_algorithms(CYBERDUCK_ALGORITHMS, msg_type=False))


def test_cookie_that_starts_with_20_is_not_mistaken_for_the_type_byte() -> None:
    cookie = bytes([MSG_KEXINIT]) + bytes(15)  # the cookie is 16 random bytes: 1 in 256 start like this
    k = parse_kexinit(from_algorithms(CYBERDUCK_ALGORITHMS, cookie=cookie))
    assert k.hassh == CYBERDUCK_HASSH


def test_event_fields_are_the_catalogued_ones() -> None:
    fields = kex_event_fields(parse_kexinit(from_algorithms(OPENSSH_78_ALGORITHMS)))
    assert set(fields) == set(CATALOGUE[CLIENT_KEX][0])
    assert fields["hassh"] == OPENSSH_78_HASSH
    assert fields["hasshAlgorithms"] == OPENSSH_78_ALGORITHMS
    assert fields["kexAlgs"] == OPENSSH_78_ALGORITHMS.split(";")[0].split(",")
    assert fields["encCS"] == OPENSSH_78_ALGORITHMS.split(";")[1].split(",")
    assert fields["macCS"] == OPENSSH_78_ALGORITHMS.split(";")[2].split(",")
    assert fields["compCS"] == ["none", "zlib@openssh.com", "zlib"]
    assert fields["keyAlgs"] == ["ssh-ed25519", "rsa-sha2-512"]
    assert fields["langCS"] == []


# -- what an attacker can send instead ----------------------------------------------------------

GOOD = from_algorithms(LIBSSH2_ALGORITHMS)
_LISTS_END = len(GOOD) - 5  # the boolean first_kex_packet_follows and the reserved uint32 follow the lists


def test_truncated_inside_header_or_lists_raises_value_error() -> None:
    for cut in range(_LISTS_END):
        with pytest.raises(ValueError, match=r"truncated|not a KEXINIT"):
            parse_kexinit(GOOD[:cut])
            pytest.fail(f"a payload cut to {cut} of {len(GOOD)} bytes was parsed")


def test_truncated_in_the_trailer_raises_value_error() -> None:
    for cut in range(_LISTS_END, len(GOOD)):
        with pytest.raises(ValueError):
            parse_kexinit(GOOD[:cut])


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        bytes([MSG_KEXINIT]),
        bytes([MSG_KEXINIT]) + COOKIE,
        bytes([MSG_KEXINIT]) + COOKIE + b"\xff\xff\xff\xff" + b"x" * 64,  # a 4 GiB name-list
        bytes([MSG_KEXINIT]) + COOKIE + struct.pack(">I", 1000) + b"curve25519-sha256",
        b"SSH-2.0-OpenSSH_9.2p1\r\n",
    ],
    ids=["empty", "type-only", "cookie-only", "huge-length", "length-past-end", "banner"],
)
def test_garbage_raises_value_error(payload: bytes) -> None:
    with pytest.raises(ValueError):
        parse_kexinit(payload)


def test_random_and_mutated_payloads_raise_only_value_error() -> None:
    rng = random.Random(20240611)
    outcomes = {"parsed": 0, "rejected": 0}
    for i in range(4000):
        if i % 2:
            data = bytearray(rng.getrandbits(8) for _ in range(rng.randrange(0, 200)))
        else:  # a good payload with a few bytes flipped and maybe cut short
            cut = rng.randrange(len(GOOD) - 40, len(GOOD)) if rng.random() < 0.25 else len(GOOD)
            data = bytearray(GOOD[:cut])
            for _ in range(rng.randrange(1, 4)):
                data[rng.randrange(1, len(data))] = rng.getrandbits(8)  # the type byte stays
        try:
            parse_kexinit(bytes(data))
        except ValueError:
            outcomes["rejected"] += 1
        else:
            outcomes["parsed"] += 1
    # Both paths were exercised, and nothing but ValueError escaped (struct.error, IndexError, ...).
    assert outcomes["parsed"] > 100 and outcomes["rejected"] > 100, outcomes


def test_non_ascii_names_are_kept_readable_not_fatal() -> None:
    payload = kexinit(["curve25519-sha256"], ["aes128-ctr"], ["hmac-sha1"], ["none"])
    evil = payload.replace(b"aes128-ctr", b"aes\xff\xfe\x80-ctr")  # same length, not ASCII
    k = parse_kexinit(evil)
    assert k.enc_cs == ["aes\ufffd\ufffd\ufffd-ctr"]
    assert len(k.hassh) == 32 and k.kex == ["curve25519-sha256"]
