"""What the server offers in its KEXINIT: Debian bookworm's OpenSSH 9.2p1 defaults, in its order.

Scanners compare the offered lists with the version in the banner (hasshServer); see README "SSH fingerprint".
``tests/integration/test_sshd_fingerprint.py`` compares them with a real sshd's, side by side.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from hashlib import sha512
from typing import Any

import asyncssh
from asyncssh import kex, kex_dh
from asyncssh.crypto import Curve25519DH
from asyncssh.kex import get_kex_algs, register_kex_alg
from asyncssh.kex_dh import MSG_KEX_DH_GEX_REQUEST, MSG_KEX_DH_GEX_REQUEST_OLD, _KexDHGex, _KexHybridECDH
from asyncssh.packet import MPInt, SSHPacket

from sandtrap.ssh import gex, sntrup761

SNTRUP761_KEX_ALGS = ("sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com")


class SNTRUP761Server:
    """asyncssh's post-quantum KEM interface (``asyncssh.crypto.pq.PQKey``), server side: encapsulation only.

    A server of a hybrid kex only encapsulates against the client's key (``ssh/sntrup761.py``, our own
    implementation). Registered for servers only (not in asyncssh's client defaults): an asyncssh client
    in this process never asks it for a key pair.
    """

    pubkey_bytes = sntrup761.PUBLIC_KEY_BYTES
    privkey_bytes = 1763  # the specification's secret key size; we never hold one
    ciphertext_bytes = sntrup761.CIPHERTEXT_BYTES
    secret_bytes = sntrup761.SECRET_BYTES

    def __init__(self, alg_name: bytes) -> None:
        self.alg_name = alg_name

    def get_public(self) -> bytes:
        raise NotImplementedError("sntrup761 is implemented for the server side only")

    def encaps(self, peer_public: bytes) -> tuple[bytes, bytes]:
        """(secret, ciphertext), as asyncssh wants them; ValueError (asyncssh: ProtocolError) on a bad key."""
        ciphertext, secret = sntrup761.encapsulate(peer_public)
        return secret, ciphertext

    def decaps(self, ciphertext: bytes) -> bytes:
        raise NotImplementedError("sntrup761 is implemented for the server side only")


def register_sntrup761() -> None:
    """Give asyncssh sntrup761x25519-sha512 under both names, unless it has them already (through liboqs).

    asyncssh 2.24 internals: its hybrid kex class and registry (``tests/unit/ssh/test_wire_internals.py``).
    """
    for alg in SNTRUP761_KEX_ALGS:
        if alg.encode() not in get_kex_algs():
            register_kex_alg(alg.encode(), _KexHybridECDH, sha512, (SNTRUP761Server, b"sntrup761", Curve25519DH), False)


register_sntrup761()


class SshdGroupExchange(_KexDHGex):
    """asyncssh's DH group exchange, server side, choosing the group as sshd does (``ssh/gex.py``).

    It takes ``KEX_DH_GEX_REQUEST`` only (sshd 9.2 answers the old single-size request as an unknown
    message); a request outside sshd's bounds ends the connection without a word, as sshd's does.
    """

    def _process_request(self, pkttype: int, pktid: int, packet: SSHPacket) -> None:
        if self._conn.is_client():
            super()._process_request(pkttype, pktid, packet)
            return
        if self._p:
            raise asyncssh.ProtocolError("Kex DH group already requested")
        self._gex_data = packet.get_remaining_payload()
        requested = packet.get_uint32(), packet.get_uint32(), packet.get_uint32()
        packet.check_end()
        bounds = gex.in_range(*requested)
        if bounds is None:
            raise asyncssh.ProtocolError(f"DH group exchange request out of range: {requested}")
        group = gex.choose(*bounds, gex.host_moduli_sizes(), _RFC3526_GROUPS)
        self._init_group(group.g, group.p)
        self._gex_data += MPInt(group.p) + MPInt(group.g)
        self.send_packet(self._group_type, MPInt(group.p), MPInt(group.g))

    _packet_handlers: Mapping[int, Callable[..., Any]] = {
        **{t: h for t, h in _KexDHGex._packet_handlers.items() if t != MSG_KEX_DH_GEX_REQUEST_OLD},
        MSG_KEX_DH_GEX_REQUEST: _process_request,
    }


# RFC 3526 groups 14 to 18, which asyncssh carries (14, 16 and 18 are sshd's own fallback groups).
_RFC3526_GROUPS = {
    2048: gex.Group(2048, kex_dh._group14_g, kex_dh._group14_p),
    3072: gex.Group(3072, kex_dh._group15_g, kex_dh._group15_p),
    4096: gex.Group(4096, kex_dh._group16_g, kex_dh._group16_p),
    6144: gex.Group(6144, kex_dh._group17_g, kex_dh._group17_p),
    8192: gex.Group(8192, kex_dh._group18_g, kex_dh._group18_p),
}
GEX_ALG = b"diffie-hellman-group-exchange-sha256"


def use_sshd_group_exchange() -> None:
    """asyncssh 2.24's kex registry: its handler for sshd's one GEX algorithm replaced by ours."""
    _handler, hash_alg, args = kex._kex_handlers[GEX_ALG]
    kex._kex_handlers[GEX_ALG] = (SshdGroupExchange, hash_alg, args)


use_sshd_group_exchange()

# `sshd -T` of Debian's 9.2p1-2+deb12u10 (the Debian build also carries the RFC name of sntrup761).
OPENSSH_KEX_ALGS = (
    "sntrup761x25519-sha512",
    "sntrup761x25519-sha512@openssh.com",
    "curve25519-sha256",
    "curve25519-sha256@libssh.org",
    "ecdh-sha2-nistp256",
    "ecdh-sha2-nistp384",
    "ecdh-sha2-nistp521",
    "diffie-hellman-group-exchange-sha256",
    "diffie-hellman-group16-sha512",
    "diffie-hellman-group18-sha512",
    "diffie-hellman-group14-sha256",
)
KEX_ALGS = list(OPENSSH_KEX_ALGS)

# What sshd appends to its kex list: the strict-kex marker (Debian's fix for Terrapin, CVE-2023-48795).
# asyncssh appends ``ext-info-s`` as well, which OpenSSH 9.2's server does not: see use_openssh_kex_extras.
KEX_EXTRAS = ("kex-strict-s-v00@openssh.com",)

# sshd offers, per host key in HostKey order (rsa, ecdsa, ed25519), the algorithms that key can sign with
# and HostKeyAlgorithms allows: no SHA-1 ``ssh-rsa`` since 8.8.
HOST_KEY_ALGS_BY_KEY = {
    "ssh-rsa": ("rsa-sha2-512", "rsa-sha2-256"),
    "ecdsa-sha2-nistp256": ("ecdsa-sha2-nistp256",),
    "ecdsa-sha2-nistp384": ("ecdsa-sha2-nistp384",),
    "ecdsa-sha2-nistp521": ("ecdsa-sha2-nistp521",),
    "ssh-ed25519": ("ssh-ed25519",),
}
HOST_KEY_ALGS = ["rsa-sha2-512", "rsa-sha2-256", "ecdsa-sha2-nistp256", "ssh-ed25519"]

ENCRYPTION_ALGS = [
    "chacha20-poly1305@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
]
MAC_ALGS = [
    "umac-64-etm@openssh.com",
    "umac-128-etm@openssh.com",
    "hmac-sha2-256-etm@openssh.com",
    "hmac-sha2-512-etm@openssh.com",
    "hmac-sha1-etm@openssh.com",
    "umac-64@openssh.com",
    "umac-128@openssh.com",
    "hmac-sha2-256",
    "hmac-sha2-512",
    "hmac-sha1",
]
COMPRESSION_ALGS = ["none", "zlib@openssh.com"]

# The server-sig-algs extension (EXT_INFO, after NEWKEYS) sshd 9.2 sends: every signature algorithm it knows.
SIGNATURE_ALGS = [
    "ssh-ed25519",
    "sk-ssh-ed25519@openssh.com",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "webauthn-sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
    "ssh-rsa",
    "rsa-sha2-256",
    "rsa-sha2-512",
]


def host_key_pairs(keys: Sequence[asyncssh.SSHKey]) -> list[asyncssh.SSHKeyPair]:
    """Key pairs for ``server_host_keys`` that offer what sshd offers for each key, in the keys' order.

    asyncssh offers every algorithm a key can sign with (for RSA: ``ssh-rsa`` and four ``@ssh.com``
    variants, SHA-256 before SHA-512); sshd offers ``rsa-sha2-512,rsa-sha2-256`` only.
    """
    pairs = list(asyncssh.load_keypairs(list(keys)))
    for pair in pairs:
        key_alg = pair.key_algorithm.decode("ascii")
        pair.host_key_algorithms = tuple(a.encode() for a in HOST_KEY_ALGS_BY_KEY.get(key_alg, (key_alg,)))
    return pairs


def use_openssh_kex_extras(conn: asyncssh.SSHServerConnection) -> None:
    """End this connection's kex list as sshd 9.2 does: the strict-kex marker, no ``ext-info-s``.

    Call it from ``connection_made``: asyncssh sends its KEXINIT only after the client's version line.
    Whether the server sends EXT_INFO depends on the client's ``ext-info-c`` alone, so nothing else changes.
    """
    extras = [a.encode() for a in KEX_EXTRAS]
    conn._get_extra_kex_algs = lambda: list(extras)  # type: ignore[method-assign]
