"""The login's environment as sshd gives it (pure logic)."""

from __future__ import annotations

import pytest

from sandtrap.bridge.login import Account, Peer, is_loopback, login_env


@pytest.mark.parametrize(
    ("ip", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("198.51.100.2", False),
        ("10.0.0.1", False),
        ("", False),
        ("localhost", False),
        ("127.0.0.1\n", False),
        ("::ffff:127.0.0.1%eth0", False),
    ],
)
def test_is_loopback(ip: str, loopback: bool) -> None:
    assert is_loopback(ip) is loopback


def test_ssh_variables_name_the_peer_and_the_server_address_given() -> None:
    account = Account("root", 0, "/root", "/bin/bash")
    env = login_env(account, Peer("198.51.100.2", 40022, "10.20.1.2", 2222), {}, None, 22)
    assert env["SSH_CONNECTION"] == "198.51.100.2 40022 10.20.1.2 22"
    assert env["SSH_CLIENT"] == "198.51.100.2 40022 22"
    # as Debian's sshd (seen on its real sshd 9.2): pam_motd's mark, no MAIL (pam_mail noenv)
    assert env["MOTD_SHOWN"] == "pam" and "MAIL" not in env
