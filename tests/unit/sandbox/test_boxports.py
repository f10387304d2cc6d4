"""Which of a box's services answer from outside it, read from the kernel's /proc/net tables."""

from __future__ import annotations

import pytest

from sandtrap.sandbox.host.boxports import answers_outside, bound

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode"
# As a little-endian kernel prints them: 0.0.0.0:80 and 127.0.0.1:8000 listening, 10.20.1.5:80 established.
TCP = "\n".join([
    HEADER,
    "   0: 00000000:0050 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0",
    "   1: 0100007F:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2 1 0 100 0 0 10 0",
    "   2: 0501140A:0050 0201A8C6:D431 01 00000000:00000000 00:00000000 00000000     0        0 3 1 0 100 0 0 10 0",
    "   3: 00000000000000000000000000000000:0016 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 4",
    "   4: 00000000000000000000000001000000:0017 00000000000000000000000000000000:0000 0A 0:0 0:0 0 0 0 5",
    "garbage line",
    "   5: ZZZZ:0050 00000000:0000 0A",
])  # fmt: skip
UDP = "\n".join([
    HEADER,
    "  10: 0501140A:1E61 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 6 2 0",
    "  11: 0100007F:1E62 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 7 2 0",
])  # fmt: skip


def test_tcp_listeners_by_port() -> None:
    assert bound(TCP, 80, "tcp") == ["0.0.0.0"]  # the established one is no listener
    assert bound(TCP, 8000, "tcp") == ["127.0.0.1"]
    assert bound(TCP, 22, "tcp") == ["::"]
    assert bound(TCP, 23, "tcp") == ["::1"]
    assert bound(TCP, 81, "tcp") == []


def test_udp_sockets_by_port() -> None:
    assert bound(UDP, 7777, "udp") == ["10.20.1.5"]
    assert bound(UDP, 7778, "udp") == ["127.0.0.1"]
    assert bound(UDP, 80, "tcp") == []


@pytest.mark.parametrize(
    ("addresses", "ok"),
    [
        (["0.0.0.0"], True),
        (["10.20.1.5"], True),
        (["::"], True),  # dual-stack unless v6only
        (["::ffff:10.20.1.5"], True),
        (["127.0.0.1"], False),  # the box's loopback only: reached from 127.0.0.1 instead
        (["::1", "10.20.1.6"], False),
        ([], False),
        (["not an address"], False),
    ],
)
def test_what_answers_on_the_box_address(addresses: list[str], ok: bool) -> None:
    assert answers_outside(addresses, "10.20.1.5") is ok
