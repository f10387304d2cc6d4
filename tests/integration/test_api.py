"""The REST API on sessions recorded from real SSH logins (asyncssh clients against a running honeypot).

Every endpoint and filter is exercised twice: in process (httpx's ASGI transport) and over the real
uvicorn socket on 127.0.0.1. Also: the live view over a socket, /metrics moving after a login, the token,
a port in use, and ``sandtrap run`` / ``sandtrap api`` refusing a non-loopback API without a token.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import signal
import socket
import sys
import tarfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sandtrap.api.app import create_app
from sandtrap.api.deps import ApiDeps
from sandtrap.api.server import ApiError, ApiServer
from sandtrap.bridge.live import LiveHub
from sandtrap.config import load_settings
from sandtrap.events import SESSION_CLOSED, SESSION_CONNECT, SESSION_FILE_UPLOAD
from sandtrap.sandbox.base import TermSize
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository

from sshclient import asyncssh_connected as ssh

pytestmark = pytest.mark.timeout(300)

Honeypot = Callable[..., Any]
PROMPT = re.compile(rb"root@[\w.-]+:[^\r\n]*# ")
PAYLOAD = b"#!/bin/sh\n# dropped by the API test\necho '<script>alert(1)</script>'\n" + os.urandom(64).hex().encode()
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()
CREDENTIALS = [{"username": "root", "password": "hunter2"}, {"username": "admin", "password": "admin"}]


def api_overrides(**api: Any) -> dict[str, Any]:
    return {
        "api": {"listen": "127.0.0.1:0", **api},
        "auth": {"credentials": CREDENTIALS, "accept_all_after": 0},
    }


async def session_of(hp: Any, conn: asyncssh.SSHClientConnection) -> str:
    port = int(conn.get_extra_info("sockname")[1])
    (event,) = await hp.wait_for(SESSION_CONNECT, src_port=port)
    return str(event.session)


async def read_until(stream: asyncssh.SSHReader[bytes], pattern: re.Pattern[bytes], timeout_s: float = 30.0) -> bytes:
    buf = b""
    async with asyncio.timeout(timeout_s):
        while not pattern.search(buf):
            chunk = await stream.read(4096)
            if not chunk:
                raise AssertionError(f"EOF before {pattern.pattern!r}; got {buf!r}")
            buf += chunk
    return buf


@dataclass
class Recorded:
    """Four sessions from real logins; ids by what they did."""

    exec_: str
    upload: str
    shell: str
    failed: str
    started: datetime


async def record_sessions(hp: Any) -> Recorded:
    started = datetime.now(UTC) - timedelta(seconds=1)
    async with ssh(hp) as conn:
        exec_ = await session_of(hp, conn)
        r = await conn.run("echo API-test-$((6*7)); uname -s", timeout=30)
        assert r.stdout == "API-test-42\nLinux\n"
    async with ssh(hp, username="admin", password="admin") as conn:
        upload = await session_of(hp, conn)
        async with conn.start_sftp_client() as sftp, sftp.open("drop.sh", "wb") as f:
            await f.write(PAYLOAD)
    async with ssh(hp) as conn:
        shell = await session_of(hp, conn)
        proc = await conn.create_process(term_type="xterm", term_size=(100, 30), encoding=None)
        await read_until(proc.stdout, PROMPT)
        proc.stdin.write(b"echo cast-$((2*21))\n")
        await read_until(proc.stdout, re.compile(rb"cast-42\r\n"))
        proc.stdin.write(b"exit\n")
        async with asyncio.timeout(30):
            await proc.wait()
    with pytest.raises(asyncssh.PermissionDenied):
        async with ssh(hp, username="oracle", password="<b>oracle</b>"):
            pass
    (failed_connect,) = [e for e in hp.events(SESSION_CONNECT) if e.session not in (exec_, upload, shell)]
    await hp.wait_for(SESSION_CLOSED, count=4, timeout_s=60)
    await hp.wait_for(SESSION_FILE_UPLOAD, shasum=PAYLOAD_SHA)
    assert await asyncio.to_thread(hp.services.database.flush, 30)
    return Recorded(exec_, upload, shell, str(failed_connect.session), started)


def clients(hp: Any) -> list[httpx.AsyncClient]:
    """In process (ASGI) and over the real socket."""
    return [
        httpx.AsyncClient(transport=httpx.ASGITransport(app=hp.services.api_app), base_url="http://asgi"),
        httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30),
    ]


async def ids(c: httpx.AsyncClient, **params: Any) -> list[str]:
    r = await c.get("/api/v1/sessions", params=params)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["total"] >= len(body["items"])
    return [s["id"] for s in body["items"]]


# -- every endpoint and filter on real sessions -----------------------------------------------------------------
async def test_every_endpoint_and_filter_on_sessions_from_real_logins(honeypot: Honeypot) -> None:
    hp = await honeypot(**api_overrides())
    rec = await record_sessions(hp)
    for c in clients(hp):
        async with c:
            await check_sessions(c, rec)
            await check_one_session(c, rec)
            await check_downloads(c, rec)
            await check_stats_and_status(c)
            await check_odd_ids(c)
    await check_raw_traversal(hp.services.api.port)


async def check_sessions(c: httpx.AsyncClient, rec: Recorded) -> None:
    everything = await ids(c)
    assert everything == [rec.failed, rec.shell, rec.upload, rec.exec_]  # newest first
    assert await ids(c, sort="started_at") == everything[::-1]
    assert set(await ids(c, sort="-duration_ms")) == set(everything)
    for sort in ("duration_ms", "commands_count", "-commands_count", "src_ip", "-src_ip"):
        assert sorted(await ids(c, sort=sort)) == sorted(everything)
    paged = [sid for offset in range(4) for sid in await ids(c, limit=1, offset=offset)]
    assert paged == everything
    page = (await c.get("/api/v1/sessions", params={"limit": 3})).json()
    assert page["total"] == 4 and page["next_offset"] == 3
    since = rec.started.isoformat()
    assert await ids(c, since=since) == everything
    assert await ids(c, until=since) == []
    assert await ids(c, since=(datetime.now(UTC) + timedelta(hours=1)).isoformat()) == []
    assert await ids(c, src_ip="127.0.0.1") == everything
    assert await ids(c, src_ip="192.0.2.1") == []
    assert await ids(c, username="root") == [rec.shell, rec.exec_]
    assert await ids(c, username="admin") == [rec.upload]
    assert await ids(c, username="oracle") == []
    assert await ids(c, command="api-TEST") == [rec.exec_]
    assert await ids(c, command="cast-$((") == [rec.shell]
    assert await ids(c, has_commands="true") == [rec.shell, rec.exec_]
    assert rec.failed in await ids(c, has_commands="false")
    with_files = await ids(c, has_artifacts="true")
    assert rec.upload in with_files and rec.failed not in with_files
    assert rec.failed in await ids(c, has_artifacts="false")
    assert await ids(c, username="admin", has_artifacts="true", src_ip="127.0.0.1") == [rec.upload]


async def check_one_session(c: httpx.AsyncClient, rec: Recorded) -> None:
    d = (await c.get(f"/api/v1/sessions/{rec.upload}")).json()
    assert d["id"] == rec.upload and d["username"] == "admin" and d["login_success"] is True
    assert d["client_version"].startswith("SSH-2.0-AsyncSSH")
    assert re.fullmatch(r"[0-9a-f]{32}", d["hassh"])
    assert [(a["username"], a["password"], a["success"]) for a in d["auth_attempts"]] == [("admin", "admin", True)]
    upload = [a for a in d["artifacts"] if a["sha256"] == PAYLOAD_SHA]
    assert upload and upload[0]["stored"] is True and upload[0]["via"] == "sftp"
    assert d["sandbox_id"] and d["sandbox"]["id"] == d["sandbox_id"]
    assert d["sandbox"]["state"] in ("assigned", "released")
    assert d["is_live"] is False and d["ended_at"] is not None

    failed = (await c.get(f"/api/v1/sessions/{rec.failed}")).json()
    assert failed["login_success"] is False and failed["username"] is None
    first = failed["auth_attempts"][0]
    assert (first["username"], first["password"]) == ("oracle", "<b>oracle</b>")

    exec_ = (await c.get(f"/api/v1/sessions/{rec.exec_}")).json()
    assert [x["input"] for x in exec_["commands"]] == ["echo API-test-$((6*7)); uname -s"]

    events = (await c.get(f"/api/v1/sessions/{rec.exec_}/events")).json()
    eventids = [e["eventid"] for e in events["items"]]
    assert eventids[0] == "cowrie.session.connect" and "cowrie.session.closed" in eventids
    assert all(e["data"]["session"] == rec.exec_ for e in events["items"])
    logins = (await c.get(f"/api/v1/sessions/{rec.exec_}/events", params={"eventid": "cowrie.login.success"})).json()
    assert [e["data"]["username"] for e in logins["items"]] == ["root"]
    page = (await c.get(f"/api/v1/sessions/{rec.exec_}/events", params={"limit": 2, "offset": 1})).json()
    assert [e["eventid"] for e in page["items"]] == eventids[1:3] and page["next_offset"] == 3
    assert (await c.get("/api/v1/sessions/000000000000")).status_code == 404
    assert (await c.get("/api/v1/sessions/000000000000/events")).status_code == 404


async def check_downloads(c: httpx.AsyncClient, rec: Recorded) -> None:
    art = await c.get(f"/api/v1/artifacts/{PAYLOAD_SHA}")
    assert art.status_code == 200 and art.content == PAYLOAD
    assert art.headers["content-type"] == "application/octet-stream"
    assert art.headers["content-disposition"] == f'attachment; filename="{PAYLOAD_SHA}.bin"'
    assert art.headers["x-content-type-options"] == "nosniff"
    assert (await c.get(f"/api/v1/artifacts/{'0' * 64}")).status_code == 404

    cast = await c.get(f"/api/v1/sessions/{rec.shell}/cast")
    assert cast.status_code == 200 and cast.headers["content-type"] == "application/x-asciicast"
    header, *frames = cast.text.splitlines()
    assert json.loads(header)["version"] == 2
    assert "cast-42" in "".join(json.loads(line)[2] for line in frames if json.loads(line)[1] == "o")
    assert (await c.get(f"/api/v1/sessions/{rec.failed}/cast")).status_code == 404

    export = await c.get(f"/api/v1/sessions/{rec.upload}/export")
    assert export.status_code == 200 and export.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(export.content), mode="r:gz") as tar:
        member = tar.getmember(f"session-{rec.upload}/artifacts/{PAYLOAD_SHA}")
        assert member.mode == 0o440 and tar.extractfile(member).read() == PAYLOAD  # type: ignore[union-attr]
        assert json.loads(tar.extractfile(f"session-{rec.upload}/metadata.json").read())["id"] == rec.upload  # type: ignore[union-attr]
    shell_export = await c.get(f"/api/v1/sessions/{rec.shell}/export")
    with tarfile.open(fileobj=io.BytesIO(shell_export.content), mode="r:gz") as tar:
        assert any(n.startswith(f"session-{rec.shell}/casts/") and n.endswith(".cast") for n in tar.getnames())


async def check_stats_and_status(c: httpx.AsyncClient) -> None:
    s = (await c.get("/api/v1/stats")).json()
    assert s["sessions"] == 4 and s["auth_attempts"] >= 4
    assert {"value": "root", "count": 2} in s["top_usernames"]
    assert {"admin", "oracle"} <= {x["value"] for x in s["top_usernames"]}
    assert {"hunter2", "admin", "<b>oracle</b>"} <= {x["value"] for x in s["top_passwords"]}
    assert {"username": "root", "password": "hunter2", "count": 2} in s["top_pairs"]
    assert s["top_src_ips"] == [{"value": "127.0.0.1", "count": 4}]
    assert s["top_client_versions"][0]["value"].startswith("SSH-2.0-AsyncSSH")
    assert "echo API-test-$((6*7)); uname -s" in {x["value"] for x in s["top_commands"]}
    assert sum(h["count"] for h in s["sessions_per_hour"]) == 4
    assert len((await c.get("/api/v1/stats", params={"top": 1})).json()["top_usernames"]) == 1
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    assert (await c.get("/api/v1/stats", params={"since": future})).json()["sessions"] == 0

    st = (await c.get("/api/v1/status")).json()
    assert st["mode"] == "honeypot" and st["engine"] == {"ok": True, "error": None}
    assert st["storage"]["ok"] is True and st["storage"]["is_down"] is False
    assert set(st["pool"]) == {"warm", "active", "preserved", "creating", "start_failures", "stop_retries"} | {
        "strays_stopped"
    }
    assert st["pool"]["preserved"] >= 1
    assert (await c.get("/healthz")).json() == {"status": "ok"}
    doc = (await c.get("/api/v1/openapi.json")).json()
    assert "/api/v1/sessions/{session_id}/live" in doc["paths"]


ODD = [
    "../../etc/passwd",
    "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
    "..%2f..%2f..%2fetc%2fpasswd",
    "0123456789ABC",
    "0123456789AB",
    "0123456789abc",
    "ＡＢＣ",
    "a" * 4096,
    "%00",
]


async def check_odd_ids(c: httpx.AsyncClient) -> None:
    for odd in ODD:
        for path in (
            f"/api/v1/sessions/{odd}",
            f"/api/v1/sessions/{odd}/cast",
            f"/api/v1/sessions/{odd}/export",
            f"/api/v1/sessions/{odd}/events",
            f"/api/v1/artifacts/{odd}",
        ):
            r = await c.get(path)
            assert r.status_code in (404, 422), (path, r.status_code)
            assert b"root:x:0:0" not in r.content


async def check_raw_traversal(port: int) -> None:
    """Request targets sent byte for byte (no client normalising the dots away)."""
    for target in (
        "/api/v1/artifacts/../../../../etc/passwd",
        "/api/v1/artifacts/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/api/v1/artifacts/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/api/v1/sessions/../../../../etc/passwd/cast",
        "/api/v1/sessions/%2e%2e%2f%2e%2e%2fetc%2fpasswd/export",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            await writer.drain()
            async with asyncio.timeout(10):
                response = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
        status = int(response.split(b" ", 2)[1])
        assert status in (400, 404, 422), (target, response[:200])
        assert b"root:x:0:0" not in response


# -- live view over the socket ----------------------------------------------------------------------------------
async def test_live_view_streams_an_active_shell_and_ends_with_it(honeypot: Honeypot) -> None:
    hp = await honeypot(**api_overrides())
    base = f"http://127.0.0.1:{hp.services.api.port}"
    async with ssh(hp) as conn, httpx.AsyncClient(base_url=base, timeout=30) as c:
        sid = await session_of(hp, conn)
        proc = await conn.create_process(term_type="xterm", term_size=(90, 25), encoding=None)
        await read_until(proc.stdout, PROMPT)
        async with asyncio.timeout(10):
            while not hp.services.ctx.hub.live.is_live(sid):
                await asyncio.sleep(0.05)
        assert (await c.get(f"/api/v1/sessions/{sid}")).status_code in (200, 404)  # row may still be queued
        async with c.stream("GET", f"/api/v1/sessions/{sid}/live") as stream:
            assert stream.status_code == 200
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = sse_events(stream)
            async with asyncio.timeout(60):
                assert await anext(events) == ("message", [0.0, "r", "90x25"])
                proc.stdin.write(b"echo live-$((6*7))\n")
                seen = ""
                while "live-42\r\n" not in seen:
                    name, frame = await anext(events)
                    assert name == "message" and frame[1] == "o"
                    seen += frame[2]
                proc.stdin.write(b"exit\n")
                while True:
                    name, data = await anext(events)
                    if name == "end":
                        assert data == {"reason": "closed"}
                        break
        await proc.wait()


async def sse_events(stream: httpx.Response) -> AsyncIterator[tuple[str, Any]]:
    name, data = "message", []
    async for line in stream.aiter_lines():
        if line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            yield name, json.loads("\n".join(data))
            name, data = "message", []


# -- metrics ----------------------------------------------------------------------------------------------------
def scrape(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_parse_and_move_after_a_login(honeypot: Honeypot) -> None:
    hp = await honeypot(**api_overrides())
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30) as c:
        before_r = await c.get("/metrics")
        assert before_r.status_code == 200
        before = scrape(before_r.text)
        assert before[("sandtrap_pool_sandboxes", (("state", "warm"),))] >= 1
        async with ssh(hp) as conn:
            assert (await conn.run("echo hi", timeout=30)).stdout == "hi\n"
            during = scrape((await c.get("/metrics")).text)
            assert during[("sandtrap_sessions_active", ())] == 1
            assert during[("sandtrap_pool_sandboxes", (("state", "active"),))] == 1
        with pytest.raises(asyncssh.PermissionDenied):
            async with ssh(hp, password="wrong"):
                pass
        await hp.wait_for(SESSION_CLOSED, count=2)
        async with asyncio.timeout(30):  # after the close: the box is stopped and kept
            while hp.services.pool.preserved < 1:
                await asyncio.sleep(0.05)
        assert await asyncio.to_thread(hp.services.database.flush, 30)
        after = scrape((await c.get("/metrics")).text)

    def grew(name: str, by: float = 1, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        assert after[key] - before.get(key, 0) >= by, (key, before.get(key), after[key])

    grew("sandtrap_sessions_total", 2)
    grew("sandtrap_auth_attempts_total", 1, result="success")
    grew("sandtrap_auth_attempts_total", 1, result="failed")
    grew("sandtrap_sandbox_acquire_seconds_count")
    grew("sandtrap_relayed_bytes_total", 3, direction="out")
    grew("sandtrap_events_total", 2, eventid="cowrie.session.connect")
    grew("sandtrap_storage_stored_events_total", 5)
    assert after[("sandtrap_sessions_active", ())] == 0
    assert after[("sandtrap_pool_sandboxes", (("state", "preserved"),))] >= 1
    assert after[("sandtrap_storage_up", ())] == 1
    assert ("sandtrap_sandbox_start_failures_total", ()) in after
    assert ("sandtrap_sandbox_stop_retries_total", ()) in after and (
        "sandtrap_sandbox_strays_stopped_total",
        (),
    ) in after


# -- the token ------------------------------------------------------------------------------------------------
async def test_token_required_over_the_socket_when_set(honeypot: Honeypot) -> None:
    token = "integration-" + os.urandom(8).hex()
    hp = await honeypot(**api_overrides(token=token))
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{hp.services.api.port}", timeout=30) as c:
        assert (await c.get("/healthz")).status_code == 200
        for path in ("/api/v1/sessions", "/api/v1/status", "/metrics", "/api/v1/openapi.json"):
            assert (await c.get(path)).status_code == 401, path
            assert (await c.get(path, headers={"Authorization": "Bearer nope"})).status_code == 401, path
            assert (await c.get(path, headers={"Authorization": f"Bearer {token}"})).status_code == 200, path
        login = await c.get("/login", params={"token": token})
        assert login.status_code == 303
        assert (await c.get("/api/v1/sessions")).status_code == 200  # the cookie the login set


# -- server life cycle ------------------------------------------------------------------------------------------
@pytest.fixture
def console_app(tmp_path: Path) -> Any:
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "data")}})
    upgrade(settings.database_url)
    repository = Repository(settings.database_url)
    try:
        yield create_app(ApiDeps(settings, repository))
    finally:
        repository.close()


async def test_a_port_in_use_is_a_clear_error(console_app: Any) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        server = ApiServer(console_app, listen)
        with pytest.raises(ApiError, match=rf"api.listen {listen}: cannot listen there"):
            await server.start()
        await server.close()


async def test_close_ends_open_live_streams_promptly(tmp_path: Path) -> None:
    settings = load_settings(None, {"storage": {"data_dir": str(tmp_path / "data")}})
    upgrade(settings.database_url)
    hub = LiveHub()
    hub.open("0123456789ab", TermSize(80, 24))
    with Repository(settings.database_url) as repository:
        server = ApiServer(create_app(ApiDeps(settings, repository, live=hub)), "127.0.0.1:0")
        await server.start()
        base = f"http://127.0.0.1:{server.port}"
        try:
            async with httpx.AsyncClient(base_url=base, timeout=10) as c:
                async with c.stream("GET", "/api/v1/sessions/0123456789ab/live") as stream:
                    events = sse_events(stream)
                    assert (await anext(events))[0] == "message"
                    t0 = time.monotonic()
                    closing = asyncio.create_task(server.close())
                    assert await anext(events) == ("end", {"reason": "server_stopping"})
                    await closing
                    assert time.monotonic() - t0 < 5
        finally:
            await server.close()
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=base, timeout=5) as c:
            await c.get("/healthz")


# -- the CLI: refusing an open API, and `sandtrap api` serving ----------------------------------------------------
def write_config(tmp_path: Path, **api: Any) -> Path:
    config = tmp_path / "sandtrap.yaml"
    config.write_text(yaml.safe_dump({"storage": {"data_dir": str(tmp_path / "data")}, "api": api}))
    return config


@pytest.mark.parametrize("command", ["run", "api"])
async def test_cli_refuses_a_non_loopback_api_without_a_token(tmp_path: Path, command: str) -> None:
    config = write_config(tmp_path, listen="0.0.0.0:8080")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandtrap.cli",
        "-c",
        str(config),
        command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "COLUMNS": "400"},
    )
    try:
        async with asyncio.timeout(60):
            _, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    message = " ".join(err.decode().split())
    assert proc.returncode != 0, message
    assert "api.listen is 0.0.0.0:8080" in message and "api.token is empty" in message, message
    assert not (tmp_path / "data").exists()  # refused before touching anything


async def test_sandtrap_api_serves_the_storage_alone(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = "console-token"
    config = write_config(tmp_path, listen=f"127.0.0.1:{port}", token=token)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sandtrap.cli",
        "-c",
        str(config),
        "api",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5, headers=headers) as c:
            async with asyncio.timeout(60):
                while True:
                    assert proc.returncode is None, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
                    try:
                        if (await c.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await asyncio.sleep(0.1)
            status = (await c.get("/api/v1/status")).json()
            assert status["mode"] == "console" and status["pool"] is None and status["storage"]["ok"] is True
            assert (await c.get("/api/v1/sessions")).json()["total"] == 0
            assert (await c.get("/metrics")).status_code == 404
            assert (await c.get("/api/v1/sessions/000000000000/live")).status_code == 404
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(20):
            await proc.wait()
        assert proc.returncode == 0, (await proc.stderr.read()).decode()  # type: ignore[union-attr]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
