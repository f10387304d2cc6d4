"""Streamlined NTRU Prime sntrup761, the encapsulation half: what an SSH server does with a client's key.

Written from the Streamlined NTRU Prime specification (round 3 of NIST's competition, the parameters
OpenSSH uses: p = 761, q = 4591, w = 286) and OpenSSH's ``PROTOCOL`` description of
``sntrup761x25519-sha512``. A server never makes a key pair nor decapsulates: it decodes the client's
public key, picks a random short polynomial r, and sends ``Encode(Round(h·r)) ‖ HashConfirm``; the
session key is ``HashSession``. numpy does the polynomial arithmetic and the radix encodings a
level at a time, so one encapsulation costs a fraction of a millisecond.

Public keys are not validated beyond their length, as in the specification: ``Decode`` takes any byte
string of the right length (every digit is reduced modulo its radix), exactly as OpenSSH does.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cache

import numpy as np
import numpy.typing as npt

P, Q, W = 761, 4591, 286
Q12 = (Q - 1) // 2
ROUNDED_RADIX = (Q + 2) // 3  # 1531: a rounded coefficient (a multiple of 3) divided by 3
PUBLIC_KEY_BYTES = 1158
CIPHERTEXT_BYTES = 1039  # Encode(Round(h·r)) (1007 bytes) then HashConfirm (32 bytes)
SECRET_BYTES = 32
INPUT_BYTES = (P + 3) // 4  # Small_encode(r): four coefficients a byte
HASH_BYTES = 32

Ints = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class _Level:
    """One step of the radix encoding: pairs of digits (radices m0, m1) merged into radix m (< 2**14).

    Everything that depends on sizes only is computed once per (n, radix): the loops below are numpy's.
    """

    pairs: int
    radix_lo: Ints  # M[2i], per pair
    radix_hi: Ints  # M[2i+1], per pair
    nbytes: Ints  # bytes each pair emits (its low bytes, least significant first)
    shifts: Ints  # 0, 8, 16, ... up to the most bytes a pair emits
    emitted: npt.NDArray[np.bool_]  # (pairs, most): which of those bytes a pair emits
    gather: npt.NDArray[np.intp]  # (pairs, most): where Decode finds each of them (a zero byte if none)
    odd_radix: int  # radix of the unpaired last digit (0 if the count is even)


@dataclass(frozen=True, slots=True)
class _Plan:
    levels: tuple[_Level, ...]
    top_radix: int  # the single digit left at the end, written in as many bytes as it needs
    top_bytes: int
    nbytes: int


def _split(m: int) -> tuple[int, int]:
    """How many bytes a pair of radix product ``m`` emits, and the radix left: while m >= 16384, m = ceil(m/256)."""
    count = 0
    while m >= 16384:
        m = (m + 255) // 256
        count += 1
    return count, m


@cache
def _plan(n: int, radix: int) -> _Plan:
    """The spec's Encode/Decode recursion for ``n`` digits of one radix, unrolled (it depends on sizes only)."""
    radices = [radix] * n
    levels: list[_Level] = []
    pos = 0
    raw_levels: list[tuple[int, Ints, Ints, Ints, int]] = []
    while len(radices) > 1:
        pairs = len(radices) // 2
        lo = np.array(radices[0 : 2 * pairs : 2], dtype=np.int64)
        hi = np.array(radices[1 : 2 * pairs : 2], dtype=np.int64)
        split = [_split(int(m)) for m in lo * hi]
        odd = radices[-1] if len(radices) % 2 else 0
        raw_levels.append((pairs, lo, hi, np.array([c for c, _ in split], dtype=np.int64), odd))
        radices = [m for _, m in split] + ([odd] if odd else [])
    top_bytes, m = 0, radices[0]
    while m > 1:
        m = (m + 255) // 256
        top_bytes += 1
    total = sum(int(nbytes.sum()) for _, _, _, nbytes, _ in raw_levels) + top_bytes
    for pairs, lo, hi, nbytes, odd in raw_levels:
        most = int(nbytes.max(initial=0))
        emitted = np.arange(most) < nbytes[:, None]
        gather = np.full((pairs, most), total, dtype=np.intp)  # index ``total``: the zero byte after the data
        count = int(nbytes.sum())
        gather[emitted] = np.arange(pos, pos + count)
        pos += count
        levels.append(_Level(pairs, lo, hi, nbytes, np.arange(most, dtype=np.int64) * 8, emitted, gather, odd))
    return _Plan(tuple(levels), radices[0], top_bytes, total)


def encode(values: Ints, radix: int) -> bytes:
    """The specification's ``Encode(R, M)`` with every ``M[i] = radix`` and ``0 <= R[i] < radix``."""
    plan = _plan(len(values), radix)
    out: list[bytes] = []
    r = values.astype(np.int64)
    for level in plan.levels:
        merged = r[0 : 2 * level.pairs : 2] + level.radix_lo * r[1 : 2 * level.pairs : 2]
        if level.shifts.size:
            digits = (merged[:, None] >> level.shifts) & 0xFF  # little-endian bytes of each pair
            out.append(digits[level.emitted].astype(np.uint8).tobytes())
            merged = merged >> (level.nbytes * 8)
        r = np.concatenate([merged, r[-1:]]) if level.odd_radix else merged
    out.append(int(r[0]).to_bytes(plan.top_bytes, "little") if plan.top_bytes else b"")
    return b"".join(out)


def decode(data: bytes, n: int, radix: int) -> Ints:
    """The specification's ``Decode(S, M)``: ``n`` digits in ``[0, radix)`` from ``len == encoded size`` bytes."""
    plan = _plan(n, radix)
    if len(data) != plan.nbytes:
        raise ValueError(f"{plan.nbytes} bytes expected, got {len(data)}")
    raw = np.frombuffer(data + b"\0", dtype=np.uint8).astype(np.int64)
    top = int.from_bytes(data[plan.nbytes - plan.top_bytes :], "little") % plan.top_radix if plan.top_bytes else 0
    r: Ints = np.array([top], dtype=np.int64)
    for level in reversed(plan.levels):
        whole = r[: level.pairs]
        if level.shifts.size:  # the pair's low bytes, then what the level above decoded
            whole = (raw[level.gather] << level.shifts).sum(axis=1) + (whole << (level.nbytes * 8))
        merged = np.empty(2 * level.pairs, dtype=np.int64)
        merged[0::2] = whole % level.radix_lo
        merged[1::2] = (whole // level.radix_lo) % level.radix_hi
        r = np.concatenate([merged, r[-1:] % level.odd_radix]) if level.odd_radix else merged
    return r


def _freeze_q(x: Ints) -> Ints:
    """Centered representative modulo q, in [-(q-1)/2, (q-1)/2]."""
    return ((x + Q12) % Q) - Q12


def multiply(h: Ints, r: Ints) -> Ints:
    """h·r in (Z/q)[x]/(x^p - x - 1), centered; h in R/q, r small."""
    # In float64, which numpy convolves several times faster than int64, and exactly: every partial sum is an
    # integer of magnitude <= p·(q-1)/2 < 2**21, far inside the 53-bit mantissa.
    full = np.convolve(h.astype(np.float64), r.astype(np.float64)).astype(np.int64)
    low, high = full[:P].copy(), full[P:]
    low[: P - 1] += high  # x^(p+k) = x^(k+1) + x^k
    low[1:P] += high
    return _freeze_q(low)


def round_to_3(x: Ints) -> Ints:
    """Each coefficient to the nearest multiple of 3 (the specification's Round)."""
    return x - (((x + 1) % 3) - 1)


def short_random(random_bytes: bytes | None = None) -> Ints:
    """A uniform weight-w polynomial in {-1, 0, 1}: the specification's sort of tagged random words."""
    words = np.frombuffer(random_bytes or os.urandom(4 * P), dtype="<u4").astype(np.uint32)
    if len(words) != P:
        raise ValueError(f"{4 * P} random bytes expected")
    tagged = words.copy()
    tagged[:W] &= np.uint32(0xFFFFFFFE)  # low bits 0 or 2: +-1
    tagged[W:] = (tagged[W:] & np.uint32(0xFFFFFFFC)) | np.uint32(1)  # low bits 1: 0
    tagged.sort()
    return (tagged & np.uint32(3)).astype(np.int64) - 1


def small_encode(r: Ints) -> bytes:
    """Four coefficients (each +1, in 0..2) a byte, lowest first; the last byte holds the 761st."""
    digits = np.zeros(4 * INPUT_BYTES, dtype=np.int64)
    digits[:P] = r + 1
    packed = digits[0::4] | (digits[1::4] << 2) | (digits[2::4] << 4) | (digits[3::4] << 6)
    return packed.astype(np.uint8).tobytes()


def hash_prefix(prefix: int, data: bytes) -> bytes:
    return hashlib.sha512(bytes([prefix]) + data).digest()[:HASH_BYTES]


def decode_public_key(public_key: bytes) -> Ints:
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise ValueError(f"sntrup761 public key of {len(public_key)} bytes, {PUBLIC_KEY_BYTES} expected")
    return decode(public_key, P, Q) - Q12


def encapsulate(public_key: bytes, r: Ints | None = None) -> tuple[bytes, bytes]:
    """(ciphertext, session key) for ``public_key``; ``r`` (weight w, in {-1, 0, 1}) for known answers only."""
    h = decode_public_key(public_key)
    if r is None:
        r = short_random()
    c = round_to_3(multiply(h, r))
    r_enc = small_encode(r)
    hashed_r = hash_prefix(3, r_enc)
    confirm = hash_prefix(2, hashed_r + hash_prefix(4, public_key))
    ciphertext = encode((c + Q12) // 3, ROUNDED_RADIX) + confirm
    return ciphertext, hash_prefix(1, hashed_r + ciphertext)
