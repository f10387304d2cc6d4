"""Where a login's TCP connection in the box comes from, and the order of the host's rules for it."""

from __future__ import annotations

import pytest

from sandtrap.sandbox.base import ClientAddress
from sandtrap.sandbox.host.relay import RelayPlan, accept_first, input_rule, mangle_rule, older_rules, plan

BOX = "10.20.1.5"


@pytest.mark.parametrize(
    ("client", "expected"),
    [
        (ClientAddress("127.0.0.1", 40000, "127.0.0.1"), RelayPlan("127.0.0.1", 40000, "127.0.0.1", True)),
        (ClientAddress("127.0.0.2", 40000, "127.0.0.3"), RelayPlan("127.0.0.2", 40000, "127.0.0.3", True)),
        # The honeypot reached on another address: the box's own loopback server address.
        (ClientAddress("127.0.0.2", 40000, "192.0.2.7"), RelayPlan("127.0.0.2", 40000, "127.0.0.1", True)),
        (ClientAddress("::1", 40000, "::1"), RelayPlan("::1", 40000, "::1", True)),
        (ClientAddress("::1", 40000, "127.0.0.1"), RelayPlan("::1", 40000, "::1", True)),
        (ClientAddress("198.51.100.2", 5555, "192.0.2.7"), RelayPlan("198.51.100.2", 5555, BOX, False)),
    ],
)
def test_plans(client: ClientAddress, expected: RelayPlan) -> None:
    assert plan(client, BOX, "") == expected


@pytest.mark.parametrize(
    ("client", "box", "refused", "reason"),
    [
        (ClientAddress("198.51.100.2", 5555, "x"), "", "", "sandbox.network: none"),
        (ClientAddress("198.51.100.2", 5555, "x"), BOX, "no xt_socket", "no xt_socket"),
        (ClientAddress("2001:db8::1", 5555, "x"), BOX, "", "IPv6"),
        (ClientAddress("not an address", 5555, "x"), BOX, "", "not an IP address"),
        (ClientAddress("127.0.0.1", 0, "127.0.0.1"), BOX, "", "not a TCP port"),
        (ClientAddress("127.0.0.1", 65536, "127.0.0.1"), BOX, "", "not a TCP port"),
    ],
)
def test_no_plan_says_why(client: ClientAddress, box: str, refused: str, reason: str) -> None:
    result = plan(client, box, refused)
    assert isinstance(result, str) and reason in result


def test_the_peer_as_the_listener_reads_it() -> None:
    assert RelayPlan("198.51.100.2", 5555, BOX, False).peer == "198.51.100.2 5555"


def test_rules_name_the_bridge_and_match_only_replies_to_transparent_sockets() -> None:
    assert mangle_rule("st-x")[:6] == ["PREROUTING", "-i", "st-x", "-m", "socket", "--transparent"]
    rule = input_rule("st-x")
    assert rule[:6] == ["INPUT", "-i", "st-x", "-m", "mark", "--mark"]
    assert rule[-5:] == ["conntrack", "--ctstate", "ESTABLISHED", "-j", "ACCEPT"]


def test_an_older_versions_rules_for_port_22_are_the_ones_replaced() -> None:
    (mangle_table, mangle), (filter_table, accept) = older_rules("st-x")
    assert mangle_table == ["-t", "mangle"] and filter_table == []
    assert (
        mangle[:7] == ["PREROUTING", "-i", "st-x", "-p", "tcp", "--sport", "22"]
        and mangle[7:] == mangle_rule("st-x")[3:]
    )
    assert accept[:7] == ["INPUT", "-i", "st-x", "-p", "tcp", "--sport", "22"] and accept[7:] == input_rule("st-x")[3:]


ACCEPT = "-A INPUT -i st-x -m mark --mark 0x5354 -m conntrack --ctstate ESTABLISHED -j ACCEPT"
OLD_ACCEPT = (
    "-A INPUT -i st-x -p tcp -m tcp --sport 22 -m mark --mark 0x5354 -m conntrack --ctstate ESTABLISHED -j ACCEPT"
)
DROP = "-A INPUT -i st-x -j DROP"


@pytest.mark.parametrize(
    ("lines", "ok"),
    [
        (["-P INPUT ACCEPT", ACCEPT, DROP], True),
        (["-P INPUT ACCEPT", DROP, ACCEPT], False),  # after the DROP it would never be reached
        (["-P INPUT ACCEPT", ACCEPT], False),  # no DROP: close_host_path has not run
        (["-P INPUT ACCEPT", DROP], False),
        (["-P INPUT ACCEPT", ACCEPT.replace("st-x", "st-y"), DROP], False),  # another bridge's
        (["-P INPUT ACCEPT", OLD_ACCEPT, DROP], False),  # an older version's, for :22 only
    ],
)
def test_accept_before_drop(lines: list[str], ok: bool) -> None:
    assert accept_first("\n".join(lines), "st-x") is ok
