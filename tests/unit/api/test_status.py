"""/api/v1/status in both modes, /healthz, the OpenAPI document, and the web UI hook."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from sandtrap import __version__
from sandtrap.api import app as api_app
from sandtrap.api import health
from sandtrap.bridge.live import LiveHub
from sandtrap.errors import SandboxUnavailable
from sandtrap.outputs.recording import RecordingHealth

Client = Callable[..., httpx.AsyncClient]


async def test_status_in_console_mode(client: Client) -> None:
    s = (await client().get("/api/v1/status")).json()
    assert s["mode"] == "console" and s["version"] == __version__ and s["sensor"] == "sensor-1"
    assert s["pool"] is None and s["engine"] is None
    assert s["storage"]["ok"] is True and s["uptime_s"] >= 0


async def test_status_in_honeypot_mode(client: Client) -> None:
    async def ping() -> None:
        return None

    pool = {"warm": 2, "active": 1, "preserved": 4, "creating": 1, "start_failures": 0, "stop_retries": 0}
    pool |= {"strays_stopped": 0}
    sink = {"pending": 0, "stored": 12, "rejected": 0, "errors": 0, "dropped": 0, "is_down": False, "last_error": ""}
    c = client(live=LiveHub(), pool_stats=lambda: pool, engine_ping=ping, storage_status=lambda: sink)
    s = (await c.get("/api/v1/status")).json()
    assert s["mode"] == "honeypot"
    assert s["pool"] == pool
    assert s["engine"] == {"ok": True, "error": None}
    assert s["storage"]["ok"] is True and s["storage"]["stored"] == 12 and s["storage"]["is_down"] is False
    assert s["recording"] is None  # nothing wired


async def test_status_reports_recording_failures(client: Client, tmp_path: Path) -> None:
    health = RecordingHealth(tmp_path)
    c = client(pool_stats=dict, recording_status=health.status)
    s = (await c.get("/api/v1/status")).json()
    assert s["recording"]["ok"] is True and s["recording"]["free_bytes"] > 0
    health.failed("jsonlog", OSError(28, "No space left on device"))
    s = (await c.get("/api/v1/status")).json()
    assert s["recording"]["ok"] is False and s["recording"]["failing"] == ["jsonlog"]
    assert s["recording"]["errors"]["jsonlog"] == 1
    assert s["recording"]["error"] == "json log: [Errno 28] No space left on device"


async def test_status_reports_an_engine_that_fails_or_hangs(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    async def down() -> None:
        raise SandboxUnavailable("engine unreachable at unix:///var/run/docker.sock")

    s = (await client(pool_stats=dict, engine_ping=down).get("/api/v1/status")).json()
    assert s["engine"] == {"ok": False, "error": "engine unreachable at unix:///var/run/docker.sock"}

    async def hangs() -> None:
        await asyncio.sleep(10)

    monkeypatch.setattr(health, "ENGINE_TIMEOUT_S", 0.01)
    s = (await client(pool_stats=dict, engine_ping=hangs).get("/api/v1/status")).json()
    assert s["engine"]["ok"] is False and "no answer" in s["engine"]["error"]


async def test_openapi_document_lists_every_endpoint(client: Client) -> None:
    doc = (await client().get("/api/v1/openapi.json")).json()
    assert doc["info"]["version"] == __version__
    paths = set(doc["paths"])
    assert {
        "/healthz",
        "/metrics",
        "/api/v1/status",
        "/api/v1/stats",
        "/api/v1/sessions",
        "/api/v1/sessions/{session_id}",
        "/api/v1/sessions/{session_id}/events",
        "/api/v1/sessions/{session_id}/cast",
        "/api/v1/sessions/{session_id}/export",
        "/api/v1/sessions/{session_id}/live",
        "/api/v1/artifacts/{sha256}",
        "/api/v1/sensors",
    } <= paths
    params = {p["name"] for p in doc["paths"]["/api/v1/sessions"]["get"]["parameters"]}
    assert params == {
        "since",
        "until",
        "src_ip",
        "username",
        "command",
        "has_commands",
        "has_artifacts",
        "protocol",
        "service",
        "sensor",
        "limit",
        "offset",
        "sort",
    }
    artifact = doc["paths"]["/api/v1/artifacts/{sha256}"]["get"]
    assert list(artifact["responses"]["200"]["content"]) == ["application/octet-stream"]
    live = doc["paths"]["/api/v1/sessions/{session_id}/live"]["get"]
    assert "text/event-stream" in live["responses"]["200"]["content"]
    ops = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert len(ops) == len(set(ops))


async def test_the_api_stands_without_the_web_ui(client: Client, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api_app, "WEB_MODULE", "sandtrap.api.no_such_web_ui")
    c = client()
    assert (await c.get("/api/v1/sessions")).status_code == 200
    assert (await c.get("/")).status_code == 404
    login = await c.get("/login")
    assert login.status_code == 303 and login.headers["location"] == "/api/v1/status"  # no token: straight in
