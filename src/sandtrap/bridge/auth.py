"""The auth policy: pure decisions, no I/O. Which attempts get in, and why (for every front end: ssh, telnet)."""

from __future__ import annotations

import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from sandtrap.config import AuthSettings

# What a Debian system accepts as a user name: useradd's default NAME_REGEX, at most 32 characters.
_VALID_USER = re.compile(r"(?=.{1,32}\Z)[a-z_][a-z0-9_-]*\$?")
_IP_MEMORY_MAX = 100_000


def is_valid_username(username: str) -> bool:
    """Names sshd could find in /etc/passwd of the box; anything else is an 'Invalid user'."""
    return bool(_VALID_USER.fullmatch(username))


@dataclass(frozen=True, slots=True)
class Decision:
    accepted: bool
    reason: str  # credential | wildcard | accept_all_after | ip_memory | publickey | invalid_user | denied


@dataclass(slots=True)
class AttemptState:
    """Per connection: how many attempts failed so far."""

    failures: int = 0


class AuthPolicy:
    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._settings = settings
        self._clock = clock
        self._pairs = {(c.username, c.password) for c in settings.credentials if c.password != "*"}
        self._wildcard_users = {c.username for c in settings.credentials if c.password == "*"}
        # src_ip -> (failures, last seen); bounded so a flood of addresses cannot grow it without limit.
        self._ip_failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def check_password(self, state: AttemptState, src_ip: str, username: str, password: str) -> Decision:
        decision = self._decide(state, src_ip, username, password)
        if not decision.accepted:
            state.failures += 1
            self._note_failure(src_ip)
        return decision

    def check_publickey(self, state: AttemptState, src_ip: str, username: str) -> Decision:
        if is_valid_username(username) and self._settings.accept_publickey:
            return Decision(True, "publickey")
        # A rejected key is not a failed password: OpenSSH's clients offer several keys first.
        return Decision(False, "invalid_user" if not is_valid_username(username) else "denied")

    def _decide(self, state: AttemptState, src_ip: str, username: str, password: str) -> Decision:
        if not is_valid_username(username):
            return Decision(False, "invalid_user")
        if (username, password) in self._pairs:
            return Decision(True, "credential")
        if username in self._wildcard_users:
            return Decision(True, "wildcard")
        n = self._settings.accept_all_after
        if n and state.failures >= n:
            return Decision(True, "accept_all_after")
        if n and self._settings.remember_ip and self._ip_count(src_ip) >= n:
            return Decision(True, "ip_memory")
        return Decision(False, "denied")

    def _ip_count(self, src_ip: str) -> int:
        entry = self._ip_failures.get(src_ip)
        if entry is None:
            return 0
        count, seen = entry
        if self._clock() - seen > self._settings.remember_ip_ttl_s:
            del self._ip_failures[src_ip]
            return 0
        return count

    def _note_failure(self, src_ip: str) -> None:
        if not self._settings.remember_ip:
            return
        self._ip_failures[src_ip] = (self._ip_count(src_ip) + 1, self._clock())
        self._ip_failures.move_to_end(src_ip)
        while len(self._ip_failures) > _IP_MEMORY_MAX:
            self._ip_failures.popitem(last=False)
