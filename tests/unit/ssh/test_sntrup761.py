"""sntrup761 encapsulation (ssh/sntrup761.py) against a literal transcription of the specification.

The specification describes Encode and Decode as short recursive procedures; ``spec_encode`` and
``spec_decode`` below follow that text line by line, scalar and slow. The fast, numpy version must give
the same bytes on random inputs and on the edge values. Interoperability with OpenSSH's own sntrup761
(its client decapsulates what we encapsulate) is tested in tests/integration/test_ssh_openssh.py.
"""

from __future__ import annotations

import hashlib
import random
import time

import numpy as np
import pytest

from sandtrap.ssh import sntrup761 as kem
from sandtrap.ssh.algorithms import SNTRUP761Server


def spec_encode(r: list[int], m: list[int]) -> list[int]:
    if not m:
        return []
    s: list[int] = []
    if len(m) == 1:
        value, radix = r[0], m[0]
        while radix > 1:
            s.append(value % 256)
            value, radix = value // 256, (radix + 255) // 256
        return s
    r2: list[int] = []
    m2: list[int] = []
    for i in range(0, len(m) - 1, 2):
        radix, value = m[i] * m[i + 1], r[i] + m[i] * r[i + 1]
        while radix >= 16384:
            s.append(value % 256)
            value, radix = value // 256, (radix + 255) // 256
        r2.append(value)
        m2.append(radix)
    if len(m) % 2:
        r2.append(r[-1])
        m2.append(m[-1])
    return s + spec_encode(r2, m2)


def spec_decode(s: list[int], m: list[int]) -> list[int]:
    if not m:
        return []
    if len(m) == 1:
        return [sum(byte * 256**i for i, byte in enumerate(s)) % m[0]]
    k = 0
    bottom: list[tuple[int, int]] = []
    m2: list[int] = []
    for i in range(0, len(m) - 1, 2):
        radix, value, scale = m[i] * m[i + 1], 0, 1
        while radix >= 16384:
            value, scale, k, radix = value + s[k] * scale, scale * 256, k + 1, (radix + 255) // 256
        bottom.append((value, scale))
        m2.append(radix)
    if len(m) % 2:
        m2.append(m[-1])
    r2 = spec_decode(s[k:], m2)
    r: list[int] = []
    for i in range(0, len(m) - 1, 2):
        value, scale = bottom[i // 2]
        value += scale * r2[i // 2]
        r.append(value % m[i])
        r.append((value // m[i]) % m[i + 1])
    if len(m) % 2:
        r.append(r2[-1])
    return r


def spec_multiply(h: list[int], r: list[int]) -> list[int]:
    """h·r in (Z/q)[x]/(x^p - x - 1), coefficient by coefficient, centered."""
    full = [0] * (2 * kem.P - 1)
    for i, hi in enumerate(h):
        if hi:
            for j, rj in enumerate(r):
                full[i + j] += hi * rj
    for i in range(2 * kem.P - 2, kem.P - 1, -1):
        full[i - kem.P] += full[i]
        full[i - kem.P + 1] += full[i]
    return [((x + kem.Q12) % kem.Q) - kem.Q12 for x in full[: kem.P]]


@pytest.mark.parametrize(("radix", "size"), [(kem.Q, kem.PUBLIC_KEY_BYTES), (kem.ROUNDED_RADIX, 1007)])
def test_encode_matches_the_specification(radix: int, size: int) -> None:
    rng = random.Random(radix)
    for values in ([0] * kem.P, [radix - 1] * kem.P, [rng.randrange(radix) for _ in range(kem.P)]):
        ours = kem.encode(np.array(values, dtype=np.int64), radix)
        assert len(ours) == size
        assert list(ours) == spec_encode(values, [radix] * kem.P)
        assert kem.decode(ours, kem.P, radix).tolist() == values


def test_decode_matches_the_specification_on_any_bytes() -> None:
    rng = random.Random(7)
    for data in (bytes(1158), b"\xff" * 1158, rng.randbytes(1158)):
        assert kem.decode(data, kem.P, kem.Q).tolist() == spec_decode(list(data), [kem.Q] * kem.P)


def test_multiply_matches_the_schoolbook_product() -> None:
    rng = random.Random(3)
    h = [rng.randrange(-kem.Q12, kem.Q12 + 1) for _ in range(kem.P)]
    h[0], h[-1] = kem.Q12, -kem.Q12
    r = kem.short_random().tolist()
    assert kem.multiply(np.array(h, dtype=np.int64), np.array(r, dtype=np.int64)).tolist() == spec_multiply(h, r)


def test_short_random_has_weight_w() -> None:
    for _ in range(20):
        r = kem.short_random()
        assert len(r) == kem.P and int(np.count_nonzero(r)) == kem.W and set(r.tolist()) <= {-1, 0, 1}


def test_small_encode_packs_four_a_byte() -> None:
    r = np.zeros(kem.P, dtype=np.int64)
    r[0], r[1], r[4], r[760] = -1, 1, 1, 1
    encoded = kem.small_encode(r)
    assert len(encoded) == kem.INPUT_BYTES == 191
    assert encoded[0] == 0b01_01_10_00 and encoded[1] == 0b01_01_01_10 and encoded[190] == 2


def test_encapsulation_follows_the_specification_for_a_fixed_r() -> None:
    """Ciphertext = Encode(Round(h·r)) ‖ HashConfirm; key = HashSession(1, ...): recomputed the long way."""
    rng = random.Random(11)
    public_key = rng.randbytes(kem.PUBLIC_KEY_BYTES)
    r = kem.short_random(rng.randbytes(4 * kem.P))
    ciphertext, key = kem.encapsulate(public_key, r)

    h = [x - kem.Q12 for x in spec_decode(list(public_key), [kem.Q] * kem.P)]
    hr = spec_multiply(h, r.tolist())
    rounded = [x - (((x + 1) % 3) - 1) for x in hr]
    assert all(x % 3 == 0 and -kem.Q12 <= x <= kem.Q12 for x in rounded)
    c = bytes(spec_encode([(x + kem.Q12) // 3 for x in rounded], [kem.ROUNDED_RADIX] * kem.P))

    def hash_prefix(b: int, data: bytes) -> bytes:
        return hashlib.sha512(bytes([b]) + data).digest()[:32]

    r_enc = kem.small_encode(r)
    confirm = hash_prefix(2, hash_prefix(3, r_enc) + hash_prefix(4, public_key))
    assert ciphertext == c + confirm and len(ciphertext) == kem.CIPHERTEXT_BYTES
    assert key == hash_prefix(1, hash_prefix(3, r_enc) + ciphertext)


@pytest.mark.parametrize("size", [0, 1, kem.PUBLIC_KEY_BYTES - 1, kem.PUBLIC_KEY_BYTES + 1, 4096])
def test_a_public_key_of_the_wrong_size_is_refused(size: int) -> None:
    with pytest.raises(ValueError):
        SNTRUP761Server(b"sntrup761").encaps(bytes(size))


def test_the_server_half_never_makes_a_key_pair() -> None:
    with pytest.raises(NotImplementedError):
        SNTRUP761Server(b"sntrup761").get_public()


def test_encapsulation_costs_well_under_a_millisecond() -> None:
    public_key = random.Random(5).randbytes(kem.PUBLIC_KEY_BYTES)
    kem.encapsulate(public_key)
    rounds = 200
    started = time.process_time()
    for _ in range(rounds):
        kem.encapsulate(public_key)
    per_call_ms = (time.process_time() - started) / rounds * 1000
    assert per_call_ms < 2.0, f"{per_call_ms:.2f} ms per encapsulation"  # about 0.23 ms here; a loaded CI allowed for
