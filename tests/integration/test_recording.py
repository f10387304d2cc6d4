"""Acceptance tests of the recording: what an attacker does, as the JSON log, the casts, the database and the
artifact store keep it, through a SIGKILL of the honeypot, and as ``sandtrap stats`` and the client's HASSH show it.

Real components throughout: the stock OpenSSH client (interactive logins inside tmux, passwords through
sshpass), the honeypot in this process (the ``honeypot`` fixture) or as a ``sandtrap run`` subprocess, SQLite
and a throw-away database on a local PostgreSQL, the asciinema player and the ``sandtrap`` command line.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import os
import re
import secrets
import signal
import stat
import subprocess
import sys
import tarfile
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from sandtrap.events import (
    CATALOGUE,
    CLIENT_KEX,
    CLIENT_SIZE,
    CLIENT_VERSION,
    COMMAND_INPUT,
    LOG_CLOSED,
    LOG_OPEN,
    LOGIN_FAILED,
    LOGIN_SUCCESS,
    SESSION_CLOSED,
    SESSION_CONNECT,
    SESSION_CRASHED,
    SESSION_FILE_CHANGED,
    SESSION_FILE_UPLOAD,
)
from sandtrap.sandbox.docker import seccomp

from helpers import DATA_DIR, remove_sensor_containers
from recording_helpers import fresh_database, postgres_base_url, screen_lines
from sshclient import EXIT_MARK, client_options, free_port, remote, run, scp_argv, ssh_argv, tmux_session

pytestmark = pytest.mark.timeout(180)

Honeypot = Callable[..., Any]
BIN = Path(sys.executable).parent
SANDTRAP = BIN / "sandtrap"
ASCIINEMA = BIN / "asciinema"
PROMPT = r"^root@[^\s:]+:~# "
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
SESSION_ID = re.compile(r"[0-9a-f]{12}")
API = {"api": {"listen": "127.0.0.1:0"}}  # honeypot overrides: the API on a free port (8080 may be taken)

# What each Cowrie event id carries beyond the envelope (docs: /work/shared/cowrie-events.md), with its JSON type.
ENVELOPE = (
    "eventid",
    "timestamp",
    "session",
    "src_ip",
    "src_port",
    "dst_ip",
    "dst_port",
    "sensor",
    "message",
    "protocol",
)
COWRIE_FIELDS: dict[str, dict[str, type]] = {
    SESSION_CONNECT: {"src_ip": str, "src_port": int, "dst_ip": str, "dst_port": int},
    CLIENT_VERSION: {"version": str},
    CLIENT_KEX: {
        "hassh": str,
        "hasshAlgorithms": str,
        "kexAlgs": list,
        "keyAlgs": list,
        "encCS": list,
        "macCS": list,
        "compCS": list,
        "langCS": list,
    },
    LOGIN_SUCCESS: {"username": str, "password": str},
    COMMAND_INPUT: {"input": str},
    SESSION_FILE_UPLOAD: {"filename": str, "outfile": str, "shasum": str},
    CLIENT_SIZE: {"width": int, "height": int},
    LOG_OPEN: {"ttylog": str},
    # Cowrie's `duplicate` is missing: see test_log_closed_carries_cowries_duplicate_flag.
    LOG_CLOSED: {"ttylog": str, "size": int, "shasum": str, "duration": str, "duration_ms": int},
    SESSION_CLOSED: {"duration": str, "duration_ms": int},
}

# The attacker of test 1: a typo fixed with backspace, arithmetic, a file made in the box; an exec; an upload.
SHELL_COMMANDS = ["echo hello", "echo $((6*7))", "echo data > /root/made-here.txt", "exit"]
MADE_PATH, MADE_BYTES = "/root/made-here.txt", b"data\n"
UPLOAD_PATH = "/root/payload.bin"
SHELL_IDS = {SESSION_CONNECT, CLIENT_VERSION, CLIENT_KEX, LOGIN_SUCCESS, CLIENT_SIZE, LOG_OPEN, COMMAND_INPUT}
SHELL_IDS |= {LOG_CLOSED, SESSION_CLOSED}
EXEC_IDS = {SESSION_CONNECT, CLIENT_VERSION, CLIENT_KEX, LOGIN_SUCCESS, COMMAND_INPUT, LOG_OPEN, LOG_CLOSED}
EXEC_IDS |= {SESSION_CLOSED}
UPLOAD_IDS = {SESSION_CONNECT, CLIENT_VERSION, CLIENT_KEX, LOGIN_SUCCESS, SESSION_FILE_UPLOAD, SESSION_CLOSED}
ONCE_PER_SESSION = (SESSION_CONNECT, CLIENT_VERSION, CLIENT_KEX, LOGIN_SUCCESS, SESSION_CLOSED)


# -- helpers -------------------------------------------------------------------------------------------------
def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_jsonlog(path: Path) -> list[dict[str, Any]]:
    """Every line of a JSON log, each of which must be one JSON object."""
    lines = []
    for n, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = json.loads(text)
        assert isinstance(line, dict), f"{path}:{n} is not a JSON object: {text[:200]}"
        lines.append(line)
    return lines


def cast_output(path: Path) -> str:
    """The text a cast's ``o`` events carry, in order (every line after the header must parse)."""
    header, *events = path.read_text(encoding="utf-8").splitlines()
    assert json.loads(header)["version"] == 2
    return "".join(e[2] for e in map(json.loads, events) if e[1] == "o")


def not_executable(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o111 == 0


def missing_in_order(wanted: list[str], shown: list[str]) -> list[str]:
    """The lines of ``wanted`` that ``shown`` lacks, reading both top-down (empty when all are there in order)."""
    rest = iter(shown)
    return [line for line in wanted if line not in rest]


async def settle(hp: Any, timeout_s: float = 20.0) -> None:
    """Wait until every event emitted so far is in the JSON log and in the database."""
    services = hp.services
    assert services.jsonlog is not None
    try:
        async with asyncio.timeout(timeout_s):
            while services.jsonlog.written + services.jsonlog.errors < services.bus.events_emitted:
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"JSON log behind: {services.jsonlog.written}/{services.bus.events_emitted}") from None
    assert services.jsonlog.errors == 0, services.jsonlog.last_error
    assert await asyncio.to_thread(services.database.flush, timeout_s), services.database.status()


async def new_session(hp: Any, known: set[str]) -> str:
    """The session that closed next: waits for one more ``cowrie.session.closed``, returns its id."""
    closed = await hp.wait_for(SESSION_CLOSED, count=len(known) + 1)
    [session] = {e.session for e in closed} - known
    known.add(session)
    return session


def asciinema(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """The installed asciinema player, without a terminal, its config kept in ``tmp_path``."""
    env = {**os.environ, "ASCIINEMA_CONFIG_HOME": str(tmp_path / "asciinema-config"), "LANG": "C.UTF-8"}
    done = subprocess.run(
        [str(ASCIINEMA), *args],
        capture_output=True,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal: the player must not touch ours
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


async def sandtrap(config: Path, *args: str) -> Any:
    """``sandtrap -c CONFIG ARGS`` to completion (bounded); a Completed with ``out``/``err``."""
    return await run([str(SANDTRAP), "-c", str(config), *args], timeout_s=60)


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data, indent=2))  # JSON is YAML
    return path


async def openssh_version() -> str:
    """The client's identification string as it sends it: ``SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10``."""
    r = await run(["ssh", "-V"], timeout_s=10)
    return "SSH-2.0-" + r.err.strip().split(",")[0]


# -- 1. one attacker, recorded everywhere, on SQLite and on PostgreSQL -----------------------------------------
@pytest.fixture(params=["sqlite", "postgresql"])
def storage(request: pytest.FixtureRequest) -> Iterator[dict[str, Any]]:
    """Honeypot overrides: the default SQLite file in the data dir, or a throw-away PostgreSQL database.

    Request it before ``honeypot`` so the honeypot stops before its database is dropped.
    """
    if request.param == "sqlite":
        yield {}
        return
    with fresh_database(postgres_base_url()) as url:
        yield {"storage": {"database_url": url}}


def check_cowrie_event(line: dict[str, Any], hp: Any, since: datetime, until: datetime) -> None:
    """The envelope every Cowrie event has, and the fields of its id with their JSON types."""
    where = f"{line.get('eventid')} (event {line.get('event_id')})"
    missing = [name for name in ENVELOPE if name not in line]
    assert not missing, f"{where}: the envelope lacks {missing}"
    assert TIMESTAMP.fullmatch(line["timestamp"]), f"{where}: timestamp {line['timestamp']!r}"
    when = datetime.strptime(line["timestamp"], "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    assert since <= when <= until, f"{where}: {when} is outside the test ({since} .. {until})"
    assert SESSION_ID.fullmatch(line["session"]), f"{where}: session {line['session']!r}"
    assert (line["src_ip"], line["dst_ip"], line["dst_port"]) == ("127.0.0.1", "127.0.0.1", hp.port), where
    assert type(line["src_port"]) is int and 0 < line["src_port"] < 65536, where
    assert (line["sensor"], line["protocol"]) == (hp.settings.sensor, "ssh"), where
    assert isinstance(line["message"], str) and line["message"].strip(), where
    for name, kind in COWRIE_FIELDS[line["eventid"]].items():
        assert name in line, f"{where}: no {name!r}"
        value = line[name]
        assert type(value) is kind, f"{where}: {name}={value!r} is not a {kind.__name__}"
        if kind is list:
            assert all(isinstance(item, str) for item in value), f"{where}: {name}={value!r}"


async def test_one_attackers_session_is_recorded_in_the_log_the_cast_the_database_and_the_artifacts(
    storage: dict[str, Any], honeypot: Honeypot, tmp_path: Path
) -> None:
    # source_ip affinity: the three connections below share one box.
    hp = await honeypot(sandbox={"affinity": "source_ip"}, **API, **storage)
    data_dir = hp.settings.data_dir
    since = datetime.now(UTC)
    known: set[str] = set()

    # An interactive login: a typo fixed with backspace, arithmetic, a file made in the box.
    async with tmux_session(ssh_argv(hp.port, options=["-tt"]), width=100, height=30) as term:
        await term.wait_for(PROMPT, timeout_s=30)
        await term.type("ehco")
        await term.keys("BSpace", "BSpace", "BSpace")
        await term.line("cho hello")
        await term.wait_for(r"^hello$")
        await term.line("echo $((6*7))")
        await term.wait_for(r"^42$")
        await term.line(f"echo data > {MADE_PATH}")
        await term.line("exit")
        assert await term.wait_exit() == 0
        pane = await term.screen()
    shell_id = await new_session(hp, known)
    # An exec, and an scp upload of random bytes.
    uname = await run(ssh_argv(hp.port, "uname -a"))
    assert uname.returncode == 0 and uname.out.startswith("Linux "), uname.err
    exec_id = await new_session(hp, known)
    payload = os.urandom(64 * 1024)
    local = tmp_path / "payload.bin"
    local.write_bytes(payload)
    upload = await run(scp_argv(hp.port, str(local), remote(UPLOAD_PATH)), timeout_s=60)
    assert upload.returncode == 0, upload.err
    upload_id = await new_session(hp, known)
    await settle(hp)
    until = datetime.now(UTC)

    # (a) The JSON log: complete, and Cowrie's ids with Cowrie's envelope and fields.
    captured = {e.event_id for e in hp.events()}
    lines = read_jsonlog(data_dir / "log" / "sandtrap.json")
    logged_ids = Counter(line["event_id"] for line in lines)
    assert max(logged_ids.values()) == 1, logged_ids.most_common(3)  # each event once
    assert captured <= set(logged_ids) <= {e.event_id for e in hp.events()}  # and every event
    assert all(line["eventid"] in CATALOGUE for line in lines)
    for line in lines:
        if line["eventid"] in COWRIE_FIELDS:
            check_cowrie_event(line, hp, since, until)

    def logged(session: str, eventid: str) -> list[dict[str, Any]]:
        return [line for line in lines if line["session"] == session and line["eventid"] == eventid]

    version = await openssh_version()
    for session, expected in ((shell_id, SHELL_IDS), (exec_id, EXEC_IDS), (upload_id, UPLOAD_IDS)):
        ids = Counter(line["eventid"] for line in lines if line["session"] == session)
        assert expected <= set(ids), f"session {session} lacks {expected - set(ids)}"
        assert all(ids[eventid] == 1 for eventid in ONCE_PER_SESSION), ids
        [connect] = logged(session, SESSION_CONNECT)
        assert connect["message"] == (
            f"New connection: 127.0.0.1:{connect['src_port']} (127.0.0.1:{hp.port}) [session: {session}]"
        )
        assert all(line["src_port"] == connect["src_port"] for line in lines if line["session"] == session)
        assert logged(session, CLIENT_VERSION)[0]["version"] == version
        [kex] = logged(session, CLIENT_KEX)
        lists = (kex["kexAlgs"], kex["encCS"], kex["macCS"], kex["compCS"])
        assert kex["hasshAlgorithms"] == ";".join(",".join(algs) for algs in lists)
        assert kex["hassh"] == hashlib.md5(kex["hasshAlgorithms"].encode()).hexdigest()
        [login] = logged(session, LOGIN_SUCCESS)
        assert (login["username"], login["password"]) == ("root", "hunter2")
        [closed] = logged(session, SESSION_CLOSED)
        assert re.fullmatch(r"\d+\.\d", closed["duration"]), closed
        assert abs(float(closed["duration"]) - closed["duration_ms"] / 1000) <= 0.051, closed
        assert 0 < closed["duration_ms"] <= (until - since).total_seconds() * 1000, closed
    typed = [(line["input"], line["message"]) for line in logged(shell_id, COMMAND_INPUT)]
    assert typed == [(c, f"CMD: {c}") for c in SHELL_COMMANDS]
    assert [line["input"] for line in logged(exec_id, COMMAND_INPUT)] == ["uname -a"]
    assert [(s["width"], s["height"]) for s in logged(shell_id, CLIENT_SIZE)] == [(100, 30)]
    casts: dict[str, Path] = {}
    for session in (shell_id, exec_id):
        [opened], [closed] = logged(session, LOG_OPEN), logged(session, LOG_CLOSED)
        assert opened["ttylog"] == closed["ttylog"]
        casts[session] = cast = data_dir / closed["ttylog"]
        data = cast.read_bytes()
        assert (closed["size"], closed["shasum"]) == (len(data), sha256(data))
        assert re.fullmatch(r"\d+\.\d", closed["duration"]), closed
        assert abs(float(closed["duration"]) - closed["duration_ms"] / 1000) <= 0.051, closed
    [uploaded] = logged(upload_id, SESSION_FILE_UPLOAD)
    assert UPLOAD_PATH in (uploaded["filename"], uploaded.get("destfile")), uploaded
    assert uploaded["shasum"] == sha256(payload)
    assert (data_dir / uploaded["outfile"]).read_bytes() == payload
    made = [line for line in logged(shell_id, SESSION_FILE_CHANGED) if line["filename"] == MADE_PATH]
    assert [line["shasum"] for line in made] == [sha256(MADE_BYTES)]

    # (b) The casts replay in asciinema and show what the terminal showed, in order; keystrokes kept raw.
    done = await asyncio.to_thread(asciinema, ["cat", str(casts[shell_id])], tmp_path)
    assert done.returncode == 0, done.stderr
    shown = screen_lines(done.stdout)
    before_exit = pane.split(EXIT_MARK, 1)[0]  # what follows is the wrapper's and tmux's own text
    wanted = [line.rstrip() for line in before_exit.splitlines() if line.strip()]
    assert "hello" in wanted and "42" in wanted, pane
    assert not missing_in_order(wanted, shown), f"missing {missing_in_order(wanted, shown)}; replayed:\n{shown}"
    raw = casts[shell_id].with_name(casts[shell_id].name + ".input.raw").read_bytes()
    assert raw.startswith(b"ehco\x7f\x7f\x7fcho hello\r")
    done = await asyncio.to_thread(asciinema, ["cat", str(casts[exec_id])], tmp_path)
    assert done.returncode == 0, done.stderr
    assert uname.out.strip() in screen_lines(done.stdout)

    # (c) The database: sessions, commands as typed (typo corrected) and as exec'd, the same events.
    repo = hp.services.repository
    assert repo.engine.dialect.name == ("postgresql" if storage else "sqlite")
    assert (data_dir / "sandtrap.db").is_file() == (not storage)
    shell, execd, up = [await asyncio.to_thread(repo.get_session, s) for s in (shell_id, exec_id, upload_id)]
    assert shell is not None and execd is not None and up is not None
    assert [(c.input, c.source) for c in shell.commands] == [(c, "tty") for c in SHELL_COMMANDS]
    assert not [c for c in shell.commands if "ehco" in c.input]
    assert [(c.input, c.source) for c in execd.commands] == [("uname -a", "exec")]
    assert up.commands == []
    for detail in (shell, execd, up):
        [kex] = logged(detail.id, CLIENT_KEX)
        assert detail.login_success and detail.username == "root"
        assert (detail.close_reason, detail.client_version, detail.hassh) == ("client_closed", version, kex["hassh"])
        assert detail.ended_at is not None and detail.duration_ms == logged(detail.id, SESSION_CLOSED)[0]["duration_ms"]
        stored = await asyncio.to_thread(repo.events, detail.id)
        assert sorted(e.event_id for e in stored) == sorted(
            line["event_id"] for line in lines if line["session"] == detail.id
        )
    for detail in (shell, execd):
        [cast] = detail.casts
        data = casts[detail.id].read_bytes()
        assert (data_dir / cast.path, cast.size, cast.sha256) == (casts[detail.id], len(data), sha256(data))

    # (d) The artifacts: the upload and the file made in the box, stored byte for byte, never executable.
    [artifact] = [a for a in up.artifacts if a.via != "changed"]
    assert (artifact.path, artifact.sha256, artifact.size, artifact.stored) == (
        UPLOAD_PATH,
        sha256(payload),
        len(payload),
        True,
    )
    assert artifact.via in ("sftp", "scp") and artifact.outfile is not None
    assert (data_dir / artifact.outfile).read_bytes() == payload
    assert not_executable(data_dir / artifact.outfile), oct((data_dir / artifact.outfile).stat().st_mode)
    [changed] = [a for a in shell.artifacts if a.path == MADE_PATH]
    assert (changed.via, changed.kind, changed.sha256, changed.stored) == ("changed", "A", sha256(MADE_BYTES), True)
    assert changed.outfile is not None
    assert (data_dir / changed.outfile).read_bytes() == MADE_BYTES
    assert not_executable(data_dir / changed.outfile)


async def test_log_closed_carries_cowries_duplicate_flag(honeypot: Honeypot) -> None:
    hp = await honeypot(**API)
    r = await run(ssh_argv(hp.port, "true"))
    assert r.returncode == 0, r.err
    await hp.wait_for(SESSION_CLOSED)
    await settle(hp)
    [line] = [
        line for line in read_jsonlog(hp.settings.data_dir / "log" / "sandtrap.json") if line["eventid"] == LOG_CLOSED
    ]
    assert isinstance(line.get("duplicate"), bool), line


# -- 2. SIGKILL mid-session: the next start closes the session as a crash; its cast and commands remain -----------
@contextlib.asynccontextmanager
async def sandtrap_run(config: Path, log: Path, timeout_s: float = 90.0) -> AsyncIterator[asyncio.subprocess.Process]:
    """``sandtrap -c CONFIG run`` as a subprocess, output to ``log``, yielded once it listens; stopped after."""
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            str(SANDTRAP), "-c", str(config), "run", stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT
        )
    try:
        try:
            async with asyncio.timeout(timeout_s):
                while "ssh listening on" not in log.read_text(errors="replace"):
                    assert proc.returncode is None, f"sandtrap run exited {proc.returncode}:\n{log.read_text()}"
                    await asyncio.sleep(0.1)
        except TimeoutError:
            raise AssertionError(f"sandtrap run did not listen within {timeout_s}s:\n{log.read_text()}") from None
        yield proc
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(60):
                    await proc.wait()
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def test_sigkill_mid_session_leaves_a_crashed_session_with_its_cast_and_commands(
    built_image: str, sensor: str, tmp_path: Path
) -> None:
    port = free_port()
    data_dir = tmp_path / "data"
    config = write_config(
        tmp_path / "sandtrap.yaml",
        {
            "sensor": sensor,
            "ssh": {"listen": f"127.0.0.1:{port}", "host_key_dir": str(tmp_path / "hostkeys")},
            "sandbox": {
                "pool_size": 1,
                "docker": {"image": built_image, "seccomp_profile": str(seccomp.find(DATA_DIR))},
            },
            "storage": {"data_dir": str(data_dir)},
            "auth": {"credentials": [{"username": "root", "password": "hunter2"}], "accept_all_after": 0},
            **API,
        },
    )
    typed = ["echo alpha-$((3*4))", "echo bravo-$((5*5))"]
    try:
        async with sandtrap_run(config, tmp_path / "run-1.log") as first:
            async with tmux_session(ssh_argv(port, options=["-tt"]), width=100, height=30) as term:
                await term.wait_for(PROMPT, timeout_s=30)
                await term.line(typed[0])
                await term.wait_for(r"^alpha-12$")
                await term.line(typed[1])
                await term.wait_for(r"^bravo-25$")
                await asyncio.sleep(1.5)  # three cast flush intervals (0.5 s)
                first.kill()
                async with asyncio.timeout(10):
                    assert await first.wait() == -signal.SIGKILL
        [connect] = [e for e in read_jsonlog(data_dir / "log" / "sandtrap.json") if e["eventid"] == SESSION_CONNECT]
        session = connect["session"]

        async with sandtrap_run(config, tmp_path / "run-2.log"):
            listed = await sandtrap(config, "sessions", "list", "--json")
            assert listed.returncode == 0, listed.err
            rows = [json.loads(line) for line in listed.out.splitlines()]
            assert [(r["id"], r["close_reason"]) for r in rows] == [(session, "crash")]

            shown = await sandtrap(config, "sessions", "show", session, "--json")
            assert shown.returncode == 0, shown.err
            detail = json.loads(shown.out)
            assert (detail["close_reason"], detail["username"]) == ("crash", "root")
            assert detail["ended_at"] is not None
            assert [c["input"] for c in detail["commands"]] == typed
            [cast] = detail["casts"]
            screen = screen_lines(cast_output(data_dir / cast["path"]))
            assert "alpha-12" in screen and "bravo-25" in screen, screen

            replay = await sandtrap(config, "sessions", "replay", session, "--speed", "100")
            assert replay.returncode == 0, replay.err
            replayed = screen_lines(replay.out)
            assert "alpha-12" in replayed and "bravo-25" in replayed, replay.out

            archive = tmp_path / "export.tar.gz"
            exported = await sandtrap(config, "sessions", "export", session, "-o", str(archive))
            assert exported.returncode == 0, exported.err
            members: dict[str, bytes] = {}
            with tarfile.open(archive, "r:gz") as tar:
                for member in tar.getmembers():
                    if (f := tar.extractfile(member)) is not None:
                        members[member.name] = f.read()
        prefix = f"session-{session}/"
        cast_name = f"{prefix}casts/{Path(cast['path']).name}"
        assert {f"{prefix}metadata.json", f"{prefix}events.jsonl", cast_name} <= set(members), sorted(members)
        metadata = json.loads(members[f"{prefix}metadata.json"])
        assert (metadata["id"], metadata["close_reason"]) == (session, "crash")
        events = [json.loads(line) for line in io.StringIO(members[f"{prefix}events.jsonl"].decode())]
        assert [e["input"] for e in events if e["eventid"] == COMMAND_INPUT] == typed
        assert [e["reason"] for e in events if e["eventid"] == SESSION_CRASHED] == ["crash"]
        assert members[cast_name] == (data_dir / cast["path"]).read_bytes()
    finally:
        await remove_sensor_containers(sensor)


# -- 3. statistics ------------------------------------------------------------------------------------------------
async def test_stats_shows_the_passwords_tried(honeypot: Honeypot, tmp_path: Path) -> None:
    hp = await honeypot(**API)  # only root/hunter2, and accept_all_after 0: a wrong password stays wrong
    passwords = [f"wrong-{secrets.token_hex(3)}" for _ in range(3)]
    for password in passwords:
        r = await run(ssh_argv(hp.port, "true", password=password), timeout_s=30)
        # Refused: sshpass sees the prompt again (5), or ssh gives up after its one prompt (255).
        assert r.returncode in (5, 255), (r.returncode, r.err)
    await hp.wait_for(SESSION_CLOSED, count=len(passwords))
    await settle(hp)
    failed = Counter(e.get("password") for e in hp.events(LOGIN_FAILED))
    assert set(failed) == set(passwords)
    assert not hp.events(LOGIN_SUCCESS)

    config = write_config(tmp_path / "stats.yaml", {"storage": {"data_dir": str(hp.settings.data_dir)}})
    stats = await sandtrap(config, "stats")
    assert stats.returncode == 0, stats.err
    attempts = sum(failed.values())
    assert f"{len(passwords)} sessions, {attempts} login attempts, 0 commands, 0 artifacts" in stats.out, stats.out
    top_passwords = stats.out.split("top passwords", 1)[1].split("top source IPs", 1)[0]
    for password, count in failed.items():
        assert re.search(rf"{re.escape(password)}\W+{count}\b", top_passwords), stats.out


# -- 4. HASSH of the OpenSSH client ---------------------------------------------------------------------------------
PSEUDO_KEX = {"ext-info-c", "kex-strict-c-v00@openssh.com"}  # signals OpenSSH appends; `ssh -G` does not list them
COMPRESSION = {"no": ["none", "zlib@openssh.com", "zlib"], "yes": ["zlib@openssh.com", "zlib", "none"]}


async def test_openssh_client_hassh_is_the_md5_of_the_algorithms_it_offered(honeypot: Honeypot) -> None:
    """No published HASSH fits this client build (Debian's 9.2p1 offers sntrup761x25519-sha512 first and the
    Terrapin kex-strict marker), so the check is against the client's own configuration, as ``ssh -G`` reports it."""
    hp = await honeypot(**API)
    known: set[str] = set()
    chosen = ["-C", "-o", "KexAlgorithms=curve25519-sha256,diffie-hellman-group14-sha256"]
    chosen += ["-o", "Ciphers=aes256-gcm@openssh.com,aes128-ctr", "-o", "MACs=hmac-sha2-256-etm@openssh.com"]
    for options in ([], chosen):
        r = await run(ssh_argv(hp.port, "true", options=options))
        assert r.returncode == 0, r.err
        session = await new_session(hp, known)
        [kex] = hp.events(CLIENT_KEX, session=session)
        g = await run(["ssh", "-G", *client_options(), "-p", str(hp.port), *options, "root@127.0.0.1"], timeout_s=10)
        assert g.returncode == 0, g.err
        config = dict(line.split(" ", 1) for line in g.out.splitlines() if " " in line)

        offered = config["kexalgorithms"].split(",")
        kex_algs = kex.get("kexAlgs")
        assert kex_algs[: len(offered)] == offered
        assert "ext-info-c" in kex_algs[len(offered) :] and set(kex_algs[len(offered) :]) <= PSEUDO_KEX, kex_algs
        assert kex.get("encCS") == config["ciphers"].split(",")
        assert kex.get("macCS") == config["macs"].split(",")
        assert kex.get("compCS") == COMPRESSION[config["compression"]]
        assert kex.get("keyAlgs") == config["hostkeyalgorithms"].split(",")
        lists = (kex_algs, kex.get("encCS"), kex.get("macCS"), kex.get("compCS"))
        assert kex.get("hasshAlgorithms") == ";".join(",".join(algs) for algs in lists)
        assert kex.get("hassh") == hashlib.md5(kex.get("hasshAlgorithms").encode()).hexdigest()
        assert "curve25519-sha256" in kex_algs
        if not options:
            assert kex_algs.index("curve25519-sha256") < kex_algs.index("curve25519-sha256@libssh.org")
        else:
            assert kex_algs[0] == "curve25519-sha256"

    await settle(hp)
    hasshes = [hp.events(CLIENT_KEX, session=s)[0].get("hassh") for s in sorted(known)]
    assert len(set(hasshes)) == 2  # another configuration, another fingerprint
    for session, hassh in zip(sorted(known), hasshes, strict=True):
        detail = await asyncio.to_thread(hp.services.repository.get_session, session)
        assert detail is not None and detail.hassh == hassh
