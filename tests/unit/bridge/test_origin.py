"""Whose doing a changed file is: the login's bookkeeping, the box's daemons, or the attacker (the rest)."""

from __future__ import annotations

import pytest

from sandtrap.bridge.origin import LoginFacts, classify, shadow_origin

ROOT = LoginFacts(users=["root"])
NEW_USER = LoginFacts(users=["oracle"], new_homes=["/home/oracle"])


@pytest.mark.parametrize(
    ("path", "kind", "facts", "origin"),
    [
        ("/var/log/wtmp", "C", ROOT, "login"),
        ("/var/log/lastlog", "C", ROOT, "login"),
        ("/run/utmp", "C", ROOT, "login"),
        ("/var/log/auth.log", "A", ROOT, "login"),
        ("/var/log/journal/abc/system.journal", "C", ROOT, "login"),
        ("/run/user/0", "A", ROOT, "login"),
        ("/etc/.pwd.lock", "A", ROOT, "login"),
        # What is put in those places is not the login's.
        ("/run/user/0/x.sh", "A", ROOT, "attacker"),
        ("/var/log/journal/abc/payload.bin", "A", ROOT, "attacker"),
        # Wiping the login records is an attacker's act.
        ("/var/log/wtmp", "D", ROOT, "attacker"),
        ("/var/log/auth.log", "D", ROOT, "attacker"),
        # useradd -m's work for a new account; the same files changed by a login of an existing one are not.
        ("/etc/passwd", "C", NEW_USER, "login"),
        ("/etc/group-", "A", NEW_USER, "login"),
        ("/home/oracle/.bashrc", "A", NEW_USER, "login"),
        ("/etc/passwd", "C", ROOT, "attacker"),
        ("/home/oracle/.bashrc", "C", NEW_USER, "attacker"),  # changed after useradd wrote it
        ("/home/oracle/x.sh", "A", NEW_USER, "attacker"),
        # The box's daemons.
        ("/var/log/nginx/access.log", "C", ROOT, "system"),
        ("/var/log/cron.log", "C", ROOT, "system"),
        ("/run/crond.reboot", "A", ROOT, "system"),  # cron's first start, late in a box on a loaded host
        ("/run/nginx.pid", "A", ROOT, "system"),  # nginx up late in a box on a loaded host
        # Persistence and packages are the attacker's, whatever daemon reads them.
        ("/var/spool/cron/crontabs/root", "A", ROOT, "attacker"),
        ("/var/lib/dpkg/status", "C", ROOT, "attacker"),
        ("/var/cache/apt/archives/x.deb", "A", ROOT, "attacker"),
        # Everything else.
        ("/root/.ssh/authorized_keys", "C", ROOT, "attacker"),
        ("/tmp/b.sh", "A", ROOT, "attacker"),
        ("/var/log/wtmp.bak", "A", ROOT, "attacker"),
        ("/etc/crontab", "C", ROOT, "attacker"),
    ],
)
def test_classify(path: str, kind: str, facts: LoginFacts, origin: str) -> None:
    assert classify(path, kind, facts) == origin


SHADOW = b"root:$6$a:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"


def test_shadow_is_the_logins_when_only_its_lines_differ() -> None:
    login = SHADOW.replace(b"$6$a", b"$6$b")
    assert shadow_origin(LoginFacts(["root"], shadow_before=SHADOW, shadow_after=login)) == "login"
    added = SHADOW + b"oracle:$6$c:19000:0:99999:7:::\n"
    assert shadow_origin(LoginFacts(["oracle"], shadow_before=SHADOW, shadow_after=added)) == "login"
    both = login.replace(b"daemon:*", b"daemon:$6$x")
    assert shadow_origin(LoginFacts(["root"], shadow_before=SHADOW, shadow_after=both)) == "attacker"
    backdoor = login + b"toor:$6$y:19000:0:99999:7:::\n"
    assert shadow_origin(LoginFacts(["root"], shadow_before=SHADOW, shadow_after=backdoor)) == "attacker"


def test_shadow_without_both_copies_is_the_attackers() -> None:
    assert classify("/etc/shadow", "C", LoginFacts(["root"], shadow_after=SHADOW)) == "attacker"
    assert classify("/etc/shadow", "D", LoginFacts(["root"], shadow_before=SHADOW, shadow_after=None)) == "attacker"
