"""Whose doing a changed file is: the attacker's, the login's bookkeeping, or the box's own daemons.

A session's changed files are diffed against the box's state when the session began (after the honeypot's own
setup and planting), so what is left is what happened during the session. Of that:

* ``login``: what sshd's session writes for any login, whoever logs in: the login records (``wtmp``, ``btmp``,
  ``lastlog``, ``utmp``), the auth log and the journal's files, the runtime directory ``/run/user/<uid>`` (not
  what is put in it), the password line set for the login in ``/etc/shadow``, and for a new account what
  ``useradd -m`` writes (``passwd``, ``group``, their backups and the skeleton files in the new home). The
  records and logs are kept as metadata; the rest's contents are kept (an attacker's edit of a new home's
  ``.bashrc`` in the same session is not lost, only listed as the login's).
* ``system``: the box's own daemons' churn (nginx's logs and state, cron's log and pid, systemd's timer stamps):
  neither the attacker's doing nor to be shown as theirs, though the attacker may have caused it (a request to
  the box's nginx); contents kept.
* ``attacker``: everything else, and any bookkeeping file deleted (wiping ``wtmp`` or the auth log is an
  attacker's act), and ``/etc/shadow`` when a line other than the login's changed.

Pure: no I/O; the paths are the attacker's bytes and are only compared.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

Origin = Literal["attacker", "login", "system"]
ORIGINS: tuple[Origin, ...] = ("attacker", "login", "system")

# What sshd's session (the box's sshd-session helper, login(1) for telnet) writes for any login: its records.
_LOGIN_RECORDS = frozenset(
    {
        "/var/log/wtmp",
        "/var/log/btmp",
        "/var/log/lastlog",
        "/run/utmp",
        "/var/run/utmp",
        "/var/log/auth.log",
        "/var/log/faillog",
    }
)
_JOURNAL = "/var/log/journal/"
_LOGIN_FILES = frozenset({"/etc/.pwd.lock"})  # taken (created) by the account set-up and by shadow-utils
_RUNTIME_DIR = re.compile(r"/run/user/\d+")  # the directory itself; what is put in it is someone's doing
_LOGIND = re.compile(r"/run/systemd/(sessions/[0-9a-z.]+|users/\d+)")
# What useradd -m writes for a new account (besides the home).
_ACCOUNT_FILES = frozenset(
    f"/etc/{name}{suffix}" for name in ("passwd", "group", "gshadow", "subuid", "subgid") for suffix in ("", "-")
) | {"/etc/shadow-"}
# The box's daemons' own logs and state. Not cron's spool (a crontab is persistence), nor apt's or dpkg's (a
# package installed), nor caches: what an attacker writes there is theirs.
_SYSTEM_TREES = ("/var/log/nginx/", "/var/lib/nginx/", "/var/spool/anacron/", "/var/lib/systemd/timers/")
_SYSTEM_FILES = frozenset(
    {
        "/var/log/syslog",
        "/var/log/cron.log",
        "/var/log/daemon.log",
        "/run/crond.pid",
        "/run/crond.reboot",
        "/run/nginx.pid",  # written when nginx is up: late in a box on a loaded host (a fresh-clone run)
        "/run/rsyslogd.pid",
        "/var/lib/systemd/random-seed",
    }
)
# Skeleton files useradd copies into a new home (Debian's /etc/skel).
_SKELETON = frozenset({".bashrc", ".profile", ".bash_logout"})

SHADOW = "/etc/shadow"


@dataclass(frozen=True, slots=True)
class LoginFacts:
    """What the login did to the box: its user, and the home useradd made if the account was new."""

    users: Sequence[str] = ()
    new_homes: Sequence[str] = ()
    shadow_before: bytes | None = None  # /etc/shadow when the session began
    shadow_after: bytes | None = None  # and at its end
    extra: frozenset[str] = field(default_factory=frozenset)  # more paths the honeypot wrote for the login


def _changed_lines(before: bytes, after: bytes) -> set[bytes]:
    old, new = set(before.splitlines()), set(after.splitlines())
    return old ^ new


def shadow_origin(facts: LoginFacts) -> Origin:
    """``login`` when only the login's own lines differ (its password set, its account added), else ``attacker``."""
    if facts.shadow_before is None or facts.shadow_after is None:
        return "attacker"
    users = {u.encode("utf-8", "surrogateescape") for u in facts.users}
    changed = _changed_lines(facts.shadow_before, facts.shadow_after)
    return "login" if all(line.split(b":", 1)[0] in users for line in changed) else "attacker"


def is_login_record(path: str) -> bool:
    """A login record or log (wtmp, lastlog, utmp, auth.log, the journal's files): kept as metadata only."""
    return path in _LOGIN_RECORDS or (path.startswith(_JOURNAL) and path.endswith((".journal", ".journal~")))


def classify(path: str, kind: str, facts: LoginFacts) -> Origin:
    """The origin of one change (``kind``: A, C or D) in a session's box."""
    if path == SHADOW:
        return "attacker" if kind == "D" else shadow_origin(facts)
    if is_login_record(path) or path in _LOGIN_FILES or path in facts.extra:
        return "attacker" if kind == "D" else "login"
    if _RUNTIME_DIR.fullmatch(path) or _LOGIND.fullmatch(path):
        return "attacker" if kind == "D" else "login"
    if path in _ACCOUNT_FILES and facts.new_homes and kind != "D":
        return "login"
    for home in facts.new_homes:
        root = home.rstrip("/")
        if kind == "A" and posixpath.dirname(path) == root and posixpath.basename(path) in _SKELETON:
            return "login"
    if path in _SYSTEM_FILES or path.startswith(_SYSTEM_TREES):
        return "system"
    return "attacker"
