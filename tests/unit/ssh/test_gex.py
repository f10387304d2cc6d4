"""sshd's group exchange bounds and choice of size (ssh/gex.py), as ssh-audit's GEX test probes them."""

from __future__ import annotations

from pathlib import Path

import pytest

from sandtrap.ssh import gex
from sandtrap.ssh.algorithms import _RFC3526_GROUPS

SIZES = gex.DEBIAN_MODULI_SIZES


@pytest.mark.parametrize(
    ("request_bits", "served"),
    [
        ((512, 1024, 1536), None),  # wholly below sshd's 2048: the connection ends
        ((1024, 1024, 1024), None),
        ((2048, 2048, 2048), 2048),
        ((2048, 3072, 4096), 3072),  # ssh-audit's second pass against OpenSSH
        ((2048, 8192, 8192), 8192),  # OpenSSH's client with chacha20-poly1305
        ((2048, 2048, 8192), 2048),
        ((1024, 2000, 4096), 2048),
        ((2048, 7000, 8192), 8192),  # sshd: a 7680-bit prime; RFC 3526 has none, the next group up
        ((4096, 2048, 8192), None),  # n below min
        ((2048, 4096, 3072), None),  # max below n
        ((3000, 3000, 3000), 2048),  # no prime size in range: sshd's fallback by max alone (< 3072: group 14)
    ],
)
def test_group_served_for_a_request(request_bits: tuple[int, int, int], served: int | None) -> None:
    bounds = gex.in_range(*request_bits)
    if served is None:
        assert bounds is None
        return
    assert bounds is not None
    group = gex.choose(*bounds, SIZES, _RFC3526_GROUPS)
    assert group.size == served == group.p.bit_length()


def test_moduli_file_sizes_are_parsed_as_sshd_counts_them() -> None:
    text = "# Time Type Tests Tries Size Generator Modulus\n1 2 6 100 2047 2 FF\n1 2 6 100 3071 5 FF\n1 1 6 100 4095 2 FF\n"
    assert gex.moduli_sizes(text) == {2048, 3072}
    host = Path("/etc/ssh/moduli")
    if host.exists():
        assert gex.moduli_sizes(host.read_text()) == gex.DEBIAN_MODULI_SIZES
