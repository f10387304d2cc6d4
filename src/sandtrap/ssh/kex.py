"""KEXINIT parsing and HASSH (salesforce/hassh): md5 over ``kex;enc;mac;comp``.

The client's HASSH uses its client-to-server lists; the server's ``hasshServer`` uses the
server-to-client lists of the server's KEXINIT.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

MSG_KEXINIT = 20


@dataclass(frozen=True, slots=True)
class KexInit:
    kex: list[str]
    host_key: list[str]
    enc_cs: list[str]
    enc_sc: list[str]
    mac_cs: list[str]
    mac_sc: list[str]
    comp_cs: list[str]
    comp_sc: list[str]
    lang_cs: list[str]
    lang_sc: list[str]

    @property
    def hassh_algorithms(self) -> str:
        return ";".join(",".join(x) for x in (self.kex, self.enc_cs, self.mac_cs, self.comp_cs))

    @property
    def hassh(self) -> str:
        return hashlib.md5(self.hassh_algorithms.encode(), usedforsecurity=False).hexdigest()

    @property
    def hassh_server_algorithms(self) -> str:
        return ";".join(",".join(x) for x in (self.kex, self.enc_sc, self.mac_sc, self.comp_sc))

    @property
    def hassh_server(self) -> str:
        return hashlib.md5(self.hassh_server_algorithms.encode(), usedforsecurity=False).hexdigest()


def parse_kexinit(payload: bytes) -> KexInit:
    """Parse a KEXINIT payload, starting with its message-type byte (as asyncssh keeps it)."""
    if payload[:1] != bytes([MSG_KEXINIT]):
        raise ValueError("not a KEXINIT payload (message type 20 expected)")
    pos = 1 + 16  # type, cookie
    lists: list[list[str]] = []
    for _ in range(10):
        if pos + 4 > len(payload):
            raise ValueError("truncated KEXINIT")
        (n,) = struct.unpack_from(">I", payload, pos)
        pos += 4
        if pos + n > len(payload):
            raise ValueError("truncated KEXINIT name-list")
        raw = payload[pos : pos + n].decode("ascii", "replace")
        pos += n
        lists.append(raw.split(",") if raw else [])
    if pos + 5 > len(payload):  # first_kex_packet_follows (bool) and reserved (uint32)
        raise ValueError("truncated KEXINIT trailer")
    return KexInit(*lists)


def kex_event_fields(kexinit: KexInit) -> dict[str, object]:
    """The fields of Cowrie's ``cowrie.client.kex`` event."""
    return {
        "hassh": kexinit.hassh,
        "hasshAlgorithms": kexinit.hassh_algorithms,
        "kexAlgs": kexinit.kex,
        "keyAlgs": kexinit.host_key,
        "encCS": kexinit.enc_cs,
        "macCS": kexinit.mac_cs,
        "compCS": kexinit.comp_cs,
        "langCS": kexinit.lang_cs,
    }
