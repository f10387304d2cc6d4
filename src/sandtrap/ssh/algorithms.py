"""What the server offers in its KEXINIT: Debian bookworm's OpenSSH 9.2p1 defaults, in its order.

Scanners compare the offered lists with the version in the banner (hasshServer); see README "SSH fingerprint".
``tests/integration/test_sshd_fingerprint.py`` compares them with a real sshd's, side by side, and
documents what asyncssh cannot match.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from hashlib import sha512
from typing import Any

import asyncssh
from asyncssh.crypto import Curve25519DH
from asyncssh.kex import get_kex_algs, register_kex_alg
from asyncssh.kex_dh import _KexHybridECDH

SNTRUP761_KEX_ALGS = ("sntrup761x25519-sha512", "sntrup761x25519-sha512@openssh.com")


class PQCryptoSNTRUP761:
    """asyncssh's KEM interface over the ``pqcrypto`` wheel's sntrup761 (PQClean, same as liboqs and OpenSSH)."""

    pubkey_bytes, privkey_bytes, ciphertext_bytes, secret_bytes = 1158, 1763, 1039, 32

    def __init__(self, alg_name: bytes, kem: Any) -> None:
        self._kem = kem
        self._keys: tuple[bytes, bytes] | None = None  # made on first use: a server only encapsulates

    def _keypair(self) -> tuple[bytes, bytes]:
        if self._keys is None:
            self._keys = self._kem.keygen()
        return self._keys

    def get_public(self) -> bytes:
        return bytes(self._keypair()[0])

    def encaps(self, peer_public: bytes) -> tuple[bytes, bytes]:
        if len(peer_public) != self.pubkey_bytes:
            raise ValueError("Invalid public key")
        ciphertext, secret = self._kem.encaps(peer_public)
        return bytes(secret), bytes(ciphertext)

    def decaps(self, ciphertext: bytes) -> bytes:
        if len(ciphertext) != self.ciphertext_bytes:
            raise ValueError("Invalid ciphertext")
        return bytes(self._kem.decaps(self._keypair()[1], ciphertext))


def register_sntrup761() -> bool:
    """Give asyncssh sntrup761x25519-sha512 when it lacks liboqs but ``pqcrypto`` is installed.

    Returns whether asyncssh now has it. asyncssh 2.24 internals: its hybrid kex class and registry.
    """
    if all(a.encode() in get_kex_algs() for a in SNTRUP761_KEX_ALGS):
        return True
    try:
        kem = importlib.import_module("pqcrypto.kem.sntrup_761")
    except ImportError:
        return False

    def make(alg_name: bytes) -> PQCryptoSNTRUP761:
        return PQCryptoSNTRUP761(alg_name, kem)

    for alg in SNTRUP761_KEX_ALGS:
        if alg.encode() not in get_kex_algs():
            register_kex_alg(alg.encode(), _KexHybridECDH, sha512, (make, b"sntrup761", Curve25519DH), True)
    return True


register_sntrup761()

# `sshd -T` of Debian's 9.2p1-2+deb12u10 (the Debian build also carries the RFC name of sntrup761).
# asyncssh offers sntrup761 with liboqs or, through register_sntrup761, with the pqcrypto wheel;
# with neither, those two are left out.
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
KEX_ALGS = [alg for alg in OPENSSH_KEX_ALGS if alg.encode() in get_kex_algs()]

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
