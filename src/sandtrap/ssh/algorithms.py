"""What the server offers in its KEXINIT: Debian bookworm's OpenSSH 9.2p1 defaults, in its order.

Scanners compare the offered lists with the version in the banner (hasshServer); see README "SSH fingerprint".
``tests/integration/test_sshd_fingerprint.py`` compares them with a real sshd's, side by side.
"""

from __future__ import annotations

from collections.abc import Sequence
from hashlib import sha512

import asyncssh
from asyncssh.crypto import Curve25519DH
from asyncssh.kex import get_kex_algs, register_kex_alg
from asyncssh.kex_dh import _KexHybridECDH

from sandtrap.ssh import sntrup761

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
