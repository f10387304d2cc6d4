"""Per-session honeytokens: unique per box, in the session's record, and a read is recorded."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import asyncssh

from sandtrap.bridge.honeytokens import generate


def test_generated_tokens_differ_every_time() -> None:
    a, b = generate(), generate()
    assert [t.kind for t in a] == ["aws", "db_password", "ssh_key", "api_token"]
    for x, y in zip(a, b, strict=True):
        assert x.path == y.path and x.value != y.value and x.content != y.content
    aws = a[0]
    assert aws.value.startswith("AKIA") and len(aws.value) == 20 and aws.value.encode() in aws.content


async def run(port: int, command: str) -> asyncssh.SSHCompletedProcess:
    async with asyncssh.connect(
        "127.0.0.1", port, username="root", password="hunter2", known_hosts=None, client_keys=None
    ) as conn:
        return await conn.run(command, timeout=30)


async def test_tokens_unique_per_sandbox_recorded_and_reads_detected(honeypot: Callable[..., Any]) -> None:
    hp = await honeypot()
    first = await run(hp.port, "cat /root/.aws/credentials")
    second = await run(
        hp.port, "grep -h aws_access_key_id /root/.aws/credentials; echo; date +%s; stat -c %Y /root/.aws/credentials"
    )
    issued = await hp.wait_for("sandtrap.honeytoken.issued", count=8)
    by_session: dict[str, dict[str, str]] = {}
    for e in issued:
        by_session.setdefault(e.session, {})[e.get("kind")] = e.get("value")
    assert len(by_session) == 2
    (s1, t1), (s2, t2) = by_session.items()
    assert set(t1) == set(t2) == {"aws", "db_password", "ssh_key", "api_token"}
    assert all(t1[k] != t2[k] for k in t1)  # every value differs between the two boxes
    # What the attacker read is exactly what this session's record says it was given.
    assert t1["aws"] in str(first.stdout) and t2["aws"] in str(second.stdout)
    # The lure files look old, like the rest of the box, not planted today (20 to 220 days).
    now_s, mtime_s = (int(x) for x in str(second.stdout).split()[-2:])
    assert 20 * 86400 <= now_s - mtime_s <= 221 * 86400
    reads = await hp.wait_for("sandtrap.honeytoken.read", count=2, kind="aws")
    assert {e.session for e in reads} == {s1, s2}
    assert all(e.get("path") == "/root/.aws/credentials" for e in reads)
    # Our own collection of changed files at session end is not reported as a read.
    await hp.wait_for("cowrie.session.closed", count=2)
    assert len(hp.events("sandtrap.honeytoken.read")) == 2


async def test_tokens_are_in_the_session_record(honeypot: Callable[..., Any]) -> None:
    hp = await honeypot()
    await run(hp.port, "true")
    await hp.wait_for("cowrie.session.closed")
    hp.services.database.flush(10)
    session = hp.events("sandtrap.honeytoken.issued")[0].session
    stored = hp.services.repository.events(session, eventid="sandtrap.honeytoken.issued")
    assert {e.data["kind"] for e in stored} == {"aws", "db_password", "ssh_key", "api_token"}
