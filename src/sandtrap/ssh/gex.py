"""Diffie-Hellman group exchange as sshd 9.2 serves it: its bounds and its choice of group size.

sshd answers a ``KEX_DH_GEX_REQUEST (min, n, max)`` from ``/etc/ssh/moduli`` (dh.c ``choose_dh``): sizes
are clamped to 2048..8192 bits, a request wholly outside them ends the connection, and among the primes
in range it takes the size closest above ``n`` (a prime picked at random among those of that size);
without the file, its fixed fallback groups (RFC 3526 group 14, 16 or 18). asyncssh's own choice serves
a 1024-bit group to whoever asks, which scanners (ssh-audit's GEX test) tell apart.

We choose the size as sshd does from the sizes Debian's moduli file holds, and serve the RFC 3526 group
of that size: a prime from the file would cost seconds of parameter checks per connection in OpenSSL
(a denial of service), the well-known groups none. Debian's file also has 7680-bit primes, which RFC 3526
lacks: a request whose best size is 7680 gets 8192 bits here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

DH_GRP_MIN, DH_GRP_MAX = 2048, 8192  # OpenSSH dh.h
MODULI = Path("/etc/ssh/moduli")
MODULI_SAFE_PRIME = "2"  # the moduli file's Type field sshd takes (safe primes)


@dataclass(frozen=True, slots=True)
class Group:
    size: int  # bits
    g: int
    p: int


def moduli_sizes(text: str) -> frozenset[int]:
    """The prime sizes, in bits, of the moduli file's lines sshd would take (safe primes, Size + 1)."""
    sizes: set[int] = set()
    for line in text.splitlines():
        fields = line.split()
        if len(fields) == 7 and not line.lstrip().startswith("#") and fields[1] == MODULI_SAFE_PRIME:
            try:
                sizes.add(int(fields[4]) + 1)
            except ValueError:
                continue
    return frozenset(sizes)


# Debian bookworm's /etc/ssh/moduli, for a host without it (sandtrap need not run beside an sshd).
DEBIAN_MODULI_SIZES = frozenset({2048, 3072, 4096, 6144, 7680, 8192})


@cache
def host_moduli_sizes(path: Path = MODULI) -> frozenset[int]:
    try:
        sizes = moduli_sizes(path.read_text(encoding="ascii", errors="replace"))
    except OSError:
        return DEBIAN_MODULI_SIZES
    if not sizes:
        log.warning("%s holds no usable primes: group exchange serves sshd's fallback groups only", path)
    return sizes


def in_range(min_bits: int, n_bits: int, max_bits: int) -> tuple[int, int, int] | None:
    """sshd's clamped (min, n, max), or None for a request it refuses (SSH_ERR_DH_GEX_OUT_OF_RANGE)."""
    if max_bits < min_bits or n_bits < min_bits or max_bits < n_bits or max_bits < DH_GRP_MIN:
        return None
    low, high = max(DH_GRP_MIN, min_bits), min(DH_GRP_MAX, max_bits)
    return low, min(max(DH_GRP_MIN, n_bits), DH_GRP_MAX), high


def choose_size(min_bits: int, want_bits: int, max_bits: int, sizes: frozenset[int]) -> int | None:
    """dh.c ``choose_dh``'s choice of size: the closest above ``want_bits`` within [min, max] (None: none)."""
    best = 0
    for size in sorted(sizes):  # the file's order is by size, as here
        if size > max_bits or size < min_bits:
            continue
        if (size > want_bits and size < best) or (size > best and best < want_bits):
            best = size
    return best or None


def choose(min_bits: int, want_bits: int, max_bits: int, sizes: frozenset[int], groups: dict[int, Group]) -> Group:
    """The group sshd would serve, by size: the well-known group of sshd's size, else sshd's fallback."""
    size = choose_size(min_bits, want_bits, max_bits, sizes)
    if size is not None:
        for candidate in sorted(groups):  # 7680 has no RFC 3526 group: the next one up
            if candidate >= size:
                return groups[candidate]
    # dh_new_group_fallback(max)
    return groups[2048 if max_bits < 3072 else 4096 if max_bits < 6144 else 8192]
