"""AuthPolicy: which attempts get in, and why. Pure: no sockets, no sleeps; time is a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from sandtrap.bridge import auth
from sandtrap.bridge.auth import AttemptState, AuthPolicy, Decision, is_valid_username
from sandtrap.config import AuthSettings, Credential

IP = "198.51.100.7"
OTHER_IP = "203.0.113.9"


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def policy(clock: FakeClock | None = None, **auth: Any) -> AuthPolicy:
    auth.setdefault("credentials", [Credential(username="root", password="hunter2")])
    auth.setdefault("accept_all_after", 0)
    return AuthPolicy(AuthSettings(**auth), clock=clock or FakeClock())


def fail(p: AuthPolicy, state: AttemptState, times: int, ip: str = IP, username: str = "root") -> None:
    """Make ``times`` attempts that must each be denied."""
    for i in range(times):
        d = p.check_password(state, ip, username, f"wrong-{i}")
        assert d == Decision(False, "denied"), (i, d)


# -- exact pairs and the wildcard ------------------------------------------------------------------


def test_exact_pair_is_accepted_and_only_that_pair() -> None:
    p = policy(
        credentials=[Credential(username="root", password="hunter2"), Credential(username="admin", password="x")]
    )
    s = AttemptState()
    assert p.check_password(s, IP, "root", "hunter2") == Decision(True, "credential")
    assert p.check_password(s, IP, "admin", "x") == Decision(True, "credential")
    assert s.failures == 0  # successes are not failures
    # Passwords of other users, case changes, whitespace: all denied.
    for user, pw in [("root", "x"), ("admin", "hunter2"), ("root", "Hunter2"), ("root", "hunter2 "), ("root", "")]:
        assert p.check_password(s, IP, user, pw) == Decision(False, "denied"), (user, pw)
    assert s.failures == 5


def test_star_password_accepts_any_password_for_that_user_only() -> None:
    p = policy(credentials=[Credential(username="oracle", password="*"), Credential(username="root", password="r")])
    s = AttemptState()
    for pw in ["", "*", "anything", "ünïcödé", "x" * 10_000]:
        assert p.check_password(s, IP, "oracle", pw) == Decision(True, "wildcard"), pw
    assert p.check_password(s, IP, "root", "anything") == Decision(False, "denied")
    assert p.check_password(s, IP, "root", "*") == Decision(False, "denied")  # '*' is not root's password
    assert p.check_password(s, IP, "root", "r") == Decision(True, "credential")


# -- accept_all_after ----------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_accept_all_after_n_failures_then_any_password(n: int) -> None:
    p = policy(accept_all_after=n)
    s = AttemptState()
    fail(p, s, n)
    assert s.failures == n
    assert p.check_password(s, IP, "root", "whatever") == Decision(True, "accept_all_after")
    # Any valid user name, not just configured ones.
    assert p.check_password(s, IP, "postgres", "") == Decision(True, "accept_all_after")


def test_accept_all_after_counts_per_connection() -> None:
    p = policy(accept_all_after=2)
    first, second = AttemptState(), AttemptState()
    fail(p, first, 2)
    # A fresh connection starts from zero (remember_ip is off).
    assert p.check_password(second, IP, "root", "whatever") == Decision(False, "denied")
    assert p.check_password(first, IP, "root", "whatever") == Decision(True, "accept_all_after")


def test_accept_all_after_zero_never_accepts() -> None:
    p = policy(accept_all_after=0, remember_ip=True)
    s = AttemptState()
    fail(p, s, 1000)
    assert s.failures == 1000
    assert p.check_password(AttemptState(), IP, "root", "wrong") == Decision(False, "denied")
    assert p.check_password(s, IP, "root", "hunter2") == Decision(True, "credential")


# -- remember_ip ---------------------------------------------------------------------------------


def test_remember_ip_carries_failures_across_connections() -> None:
    clock = FakeClock()
    p = policy(clock, accept_all_after=3, remember_ip=True, remember_ip_ttl_s=600)
    fail(p, AttemptState(), 2)
    clock.now += 10
    fail(p, AttemptState(), 1)  # third failure overall, from a second connection
    clock.now += 10
    # A third connection with no failures of its own gets in on the address's record.
    assert p.check_password(AttemptState(), IP, "root", "anything") == Decision(True, "ip_memory")
    # Another address has no record.
    assert p.check_password(AttemptState(), OTHER_IP, "root", "anything") == Decision(False, "denied")


def test_remember_ip_off_keeps_no_record() -> None:
    p = policy(accept_all_after=2, remember_ip=False)
    for _ in range(5):
        fail(p, AttemptState(), 1)  # five connections from one address, one failure each
    assert p.check_password(AttemptState(), IP, "root", "anything") == Decision(False, "denied")


def test_remember_ip_forgets_after_ttl() -> None:
    clock = FakeClock()
    p = policy(clock, accept_all_after=2, remember_ip=True, remember_ip_ttl_s=600)
    fail(p, AttemptState(), 2)
    clock.now += 600  # exactly the TTL: still remembered
    assert p.check_password(AttemptState(), IP, "root", "x") == Decision(True, "ip_memory")
    clock.now += 600.001  # past the TTL since the last failure: forgotten
    s = AttemptState()
    assert p.check_password(s, IP, "root", "x") == Decision(False, "denied")
    # ... and counting starts again from that failure: one more is needed.
    assert p.check_password(AttemptState(), IP, "root", "x") == Decision(False, "denied")
    assert p.check_password(AttemptState(), IP, "root", "x") == Decision(True, "ip_memory")


def test_remember_ip_ttl_runs_from_the_last_failure() -> None:
    clock = FakeClock()
    p = policy(clock, accept_all_after=3, remember_ip=True, remember_ip_ttl_s=100)
    fail(p, AttemptState(), 1)
    clock.now += 90
    fail(p, AttemptState(), 1)
    clock.now += 90  # 180 s after the first failure, 90 s after the second
    fail(p, AttemptState(), 1)
    assert p.check_password(AttemptState(), IP, "root", "x") == Decision(True, "ip_memory")


def test_ip_memory_stays_bounded_and_forgets_the_oldest_address() -> None:
    p = policy(accept_all_after=1, remember_ip=True)
    fail(p, AttemptState(), 1, ip="10.255.255.254")  # the oldest entry
    flood = 100_000  # the module's bound: one more address than it keeps in all
    for i in range(flood):
        p.check_password(AttemptState(), f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}", "root", "x")
    assert len(p._ip_failures) == flood
    # The oldest address was evicted: it has to fail again.
    assert p.check_password(AttemptState(), "10.255.255.254", "root", "x") == Decision(False, "denied")
    # The newest is still remembered.
    last = flood - 1
    newest = f"10.{last >> 16}.{(last >> 8) & 255}.{last & 255}"
    assert p.check_password(AttemptState(), newest, "root", "x") == Decision(True, "ip_memory")


def test_ip_memory_evicts_the_least_recently_failed_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(auth, "_IP_MEMORY_MAX", 3)  # the same eviction as at 100_000, in four addresses
    p = policy(accept_all_after=2, remember_ip=True)
    a, b, c, d = "192.0.2.1", "192.0.2.2", "192.0.2.3", "192.0.2.4"
    for ip in (a, b, c, a):  # a fails again last: now b is the one not seen for longest
        fail(p, AttemptState(), 1, ip=ip)
    fail(p, AttemptState(), 1, ip=d)  # a fourth address: one has to go
    assert p.check_password(AttemptState(), a, "root", "x") == Decision(True, "ip_memory")  # kept, 2 failures
    fail(p, AttemptState(), 1, ip=b)  # b was forgotten: this is its first failure again, not its second
    assert p.check_password(AttemptState(), b, "root", "x") == Decision(False, "denied")


# -- user names ----------------------------------------------------------------------------------

INVALID_NAMES = [
    "",
    "Root",  # upper case
    "ROOT",
    "root ",
    " root",
    "root\n",
    "root\0",
    "ro\0ot",
    "\0",
    "-root",  # cannot start with '-'
    "1root",  # nor a digit
    "ro.ot",
    "ro:ot",
    "ro/ot",
    "root$x",  # '$' only at the end
    "$",
    "рут",  # Cyrillic
    "rööt",  # Latin-1 letters
    "root\u200b",  # zero-width space
    "ｒｏｏｔ",  # full-width
    "a" * 33,
    "a" * 10 * 1024,
    "root; rm -rf /",
    "{session}",
]


@pytest.mark.parametrize("name", INVALID_NAMES, ids=lambda n: repr(n)[:24])
def test_invalid_user_names_are_never_accepted(name: str) -> None:
    assert not is_valid_username(name)
    p = policy(
        accept_all_after=1,
        remember_ip=True,
        accept_publickey=True,
        credentials=[Credential(username=name, password="pw"), Credential(username=name, password="*")],
    )
    s = AttemptState()
    fail(p, s, 1)  # past accept_all_after, and the address is remembered
    assert p.check_password(s, IP, name, "pw") == Decision(False, "invalid_user")
    assert p.check_password(AttemptState(), IP, name, "pw") == Decision(False, "invalid_user")
    assert p.check_publickey(s, IP, name) == Decision(False, "invalid_user")
    # The same attempts with a real name get in: the name alone made the difference.
    assert p.check_password(s, IP, "root", "pw") == Decision(True, "accept_all_after")


@pytest.mark.parametrize("name", ["root", "a", "_apt", "www-data", "user_1", "a" * 31, "host01$", "a" * 31 + "$"])
def test_valid_user_names(name: str) -> None:
    assert is_valid_username(name)


def test_a_32_character_name_is_valid_as_on_debian() -> None:
    # `useradd aaaa…a` (32 a's) succeeds in sandtrap-target (passwd 1:4.13+dfsg1-1+deb12u2); 33 fails.
    assert is_valid_username("a" * 32)


def test_invalid_user_attempts_still_count_as_failures() -> None:
    p = policy(accept_all_after=2)
    s = AttemptState()
    assert p.check_password(s, IP, "Admin", "x") == Decision(False, "invalid_user")
    assert p.check_password(s, IP, "ro\0ot", "x") == Decision(False, "invalid_user")
    assert s.failures == 2
    assert p.check_password(s, IP, "admin", "x") == Decision(True, "accept_all_after")


# -- public keys -----------------------------------------------------------------------------------


def test_publickey_rejected_by_default_and_not_counted() -> None:
    p = policy(accept_all_after=1)
    s = AttemptState()
    for _ in range(5):
        assert p.check_publickey(s, IP, "root") == Decision(False, "denied")
    # A rejected key is not a failed password: accept_all_after has not started counting.
    assert s.failures == 0
    assert p.check_password(s, IP, "root", "x") == Decision(False, "denied")


def test_publickey_accepted_when_enabled() -> None:
    p = policy(accept_publickey=True)
    assert p.check_publickey(AttemptState(), IP, "root") == Decision(True, "publickey")
    assert p.check_publickey(AttemptState(), IP, "nobody-configured") == Decision(True, "publickey")
