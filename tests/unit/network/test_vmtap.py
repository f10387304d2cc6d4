"""The capture gateway in a micro-VM's namespace: never sandtrap's own namespace, the rules on the tap."""

from __future__ import annotations

import os

import pytest

from sandtrap.network import vmtap
from sandtrap.network.namespace import NetworkError, rules


async def test_our_own_namespace_is_never_taken_for_a_vms(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmtap, "NS_WAIT_S", 0.2)
    with pytest.raises(NetworkError, match="no namespace of its own"):
        await vmtap.pin_namespace(os.getpid(), "lo", "test")  # lo is there, but the namespace is ours


async def test_a_gone_process_is_an_error() -> None:
    with pytest.raises(NetworkError, match="is gone"):
        await vmtap.pin_namespace(2**22 + 7, "tap0", "test")  # above pid_max's default: no such process


def test_rules_on_the_tap_redirect_and_forward_nothing() -> None:
    text = [" ".join(r) for r in rules("10.20.1.0/24", "tap0")]
    assert "-P FORWARD DROP" in text
    assert "-A INPUT -i tap0 ! -s 10.20.1.0/24 -j DROP" in text
    assert "-t nat -A PREROUTING -i tap0 -p tcp -j REDIRECT --to-ports 1" in text
    assert "-t nat -A PREROUTING -i tap0 -p udp --dport 53 -j REDIRECT --to-ports 53" in text
    assert not any(word in line for line in text for word in ("MASQUERADE", "SNAT", "DNAT", "ACCEPT -o"))
