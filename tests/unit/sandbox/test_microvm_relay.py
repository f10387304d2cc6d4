"""The relay into the guest's sshd, its pure parts: which address the guest sees, how it logs in, what it asks."""

from __future__ import annotations

import asyncssh
import pytest

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import ClientAddress, Login, TermSize
from sandtrap.sandbox.microvm.relay import (
    MAX_REPLAYED,
    attempts,
    client_factory,
    process_options,
    replayed,
    source_address,
    usable_password,
)

GUEST = "10.20.1.13"
KEY = asyncssh.generate_private_key("ssh-ed25519")


@pytest.mark.parametrize(
    ("client", "seen"),
    [
        ("203.0.113.9", "203.0.113.9"),  # the attacker's own address
        ("::ffff:203.0.113.9", "203.0.113.9"),  # as a dual-stack listener reports it
        ("192.168.4.20", "192.168.4.20"),  # private addresses too: a server behind NAT sees them
        ("127.0.0.1", None),  # loopback cannot appear on eth0: the tap's host side
        ("127.3.4.5", None),
        ("::1", None),
        ("2001:db8::7", None),  # the guest has IPv4 only
        (GUEST, None),  # the guest's own address
        ("0.0.0.0", None),
        ("224.0.0.1", None),
        ("169.254.1.1", None),
        ("240.0.0.1", None),
        ("not an address", None),
        ("", None),
    ],
)
def test_the_guest_sees_the_attackers_own_ipv4_address_or_the_taps_host_side(client: str, seen: str | None) -> None:
    assert source_address(client, GUEST) == seen


def _login(**kw: object) -> Login:
    base: dict[str, object] = {
        "session": "s1",
        "peer": ClientAddress("203.0.113.9", 40000, GUEST),
        "username": "root",
        "password": "hunter2",
        "auth_method": "password",
        "kind": "shell",
    }
    return Login(**(base | kw))  # type: ignore[arg-type]


def test_a_password_login_is_repeated_with_the_password_then_the_access_key() -> None:
    methods = attempts(_login(), KEY)
    assert [a.method for a in methods] == ["password", "publickey"]
    first = methods[0].options
    assert first["username"] == "root" and first["preferred_auth"] == "password" and methods[0].wrong == 0
    assert first["client_keys"] is None and first["known_hosts"] is None and first["agent_path"] is None
    answers = client_factory(methods[0], _login())()
    assert [answers.password_auth_requested() for _ in range(2)] == ["hunter2", None]
    assert methods[1].options["client_keys"] == [KEY] and methods[1].options["preferred_auth"] == "publickey"
    assert client_factory(methods[1], _login())().password_auth_requested() is None


def test_the_connections_refused_passwords_are_asked_first_with_wrong_ones() -> None:
    failed = (("root", "password"), ("admin", "password"), ("root", "keyboard-interactive/pam"), ("root", "password"))
    login = _login(failed=failed)
    assert replayed(login) == 2  # root's password ones: sshd allows no change of user, kbdint is not replayed
    first = attempts(login, KEY)[0]
    answers = client_factory(first, login)()
    said = [answers.password_auth_requested() for _ in range(4)]
    assert said[2:] == ["hunter2", None] and all(w and w != "hunter2" for w in said[:2]) and said[0] != said[1]
    assert attempts(login, KEY)[1].wrong == 0  # replayed once, on the first connection
    assert replayed(_login(failed=(("root", "password"),) * 9)) == MAX_REPLAYED  # room left for the login
    by_key = attempts(_login(auth_method="publickey", password=None, failed=(("root", "password"),)), KEY)
    assert [(a.method, a.wrong, a.options["preferred_auth"]) for a in by_key] == [
        ("publickey", 1, "password,publickey")
    ]
    key_answers = client_factory(by_key[0], login)()
    assert key_answers.password_auth_requested() not in (None, "hunter2")  # a wrong one, then on to the key
    assert key_answers.password_auth_requested() is None


@pytest.mark.parametrize("password", [None, "", "a\nb", "a\rb", "a\0b"])
def test_a_password_the_guest_cannot_have_goes_by_the_access_key(password: str | None) -> None:
    assert not usable_password(password)
    assert [a.method for a in attempts(_login(password=password), KEY)] == ["publickey"]


def test_a_publickey_login_goes_by_the_access_key_and_keyboard_interactive_by_its_password() -> None:
    assert [a.method for a in attempts(_login(auth_method="publickey", password=None), KEY)] == ["publickey"]
    kbd = attempts(_login(auth_method="keyboard-interactive/pam", password="pw"), KEY)
    assert [a.method for a in kbd] == ["password", "publickey"]


def test_a_pty_shell_asks_for_the_clients_term_size_and_accepted_env() -> None:
    login = _login(term="screen-256color", env=(("LANG", "C.UTF-8"), ("LC_TIME", "C")))
    options = process_options(login, TermSize(132, 43))
    assert options == {
        "encoding": None,
        "env": {"LANG": "C.UTF-8", "LC_TIME": "C"},
        "term_type": "screen-256color",
        "term_size": (132, 43),
    }
    assert "command" not in options and "subsystem" not in options  # a shell request


def test_exec_passes_the_exact_bytes_and_a_subsystem_its_name() -> None:
    raw = b"echo \xff\xfe; id"
    options = process_options(_login(kind="exec", command=raw), None)
    assert options["command"] == raw and "term_type" not in options
    assert process_options(_login(kind="subsystem", command=b"sftp"), None)["subsystem"] == "sftp"


@pytest.mark.parametrize(("kind", "command"), [("", None), ("exec", None), ("subsystem", b"")])
def test_a_login_that_is_not_sshds_is_refused(kind: str, command: bytes | None) -> None:
    with pytest.raises(SandboxError):
        process_options(_login(kind=kind, command=command), None)
