"""``/api/v1``: recorded sessions, their events, casts and exports, artifacts, statistics.

Handlers are plain functions: FastAPI runs them in its thread pool, where the blocking repository
belongs. Ids are validated by pattern before anything else (422 otherwise); a ``StorageError`` becomes
a 503 in :mod:`sandtrap.api.app`.
"""

# No ``from __future__ import annotations`` here: FastAPI reads these signatures at run time.

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BeforeValidator

from sandtrap.api.deps import ApiDeps
from sandtrap.api.files import artifact_path, cast_paths, download, export_download, pcap_path
from sandtrap.api.models import EventPage, Problem, SessionPage, SessionView
from sandtrap.storage.records import SensorInfo, SessionDetail, Stats
from sandtrap.storage.repository import SessionSort
from sandtrap.storage.types import as_utc, clean

MAX_OFFSET = 1_000_000_000
MAX_TEXT = 1024
MAX_SENSOR = 256

SessionId = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{12}$", description="session id: 12 lowercase hex characters", examples=["0a1b2c3d4e5f"]),
]
Sha256 = Annotated[
    str,
    Path(pattern=r"^[0-9a-f]{64}$", description="SHA-256 of the content: 64 lowercase hex characters"),
]
_NUMBER = re.compile(r"\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*")


def iso_only(value: Any) -> Any:
    """Times are ISO 8601 as documented; pydantic would also take a number (Unix time) silently."""
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        raise ValueError("expected an ISO 8601 time such as 2026-01-02T03:04:05Z")
    return value


Since = Annotated[
    datetime | None,
    BeforeValidator(iso_only),
    Query(description="only sessions started at or after this time (ISO 8601; UTC if no zone)"),
]
Until = Annotated[
    datetime | None, BeforeValidator(iso_only), Query(description="only sessions started before this time")
]
Offset = Annotated[int, Query(ge=0, le=MAX_OFFSET)]
SensorFilter = Annotated[
    str | None,
    Query(max_length=MAX_SENSOR, description="only this sensor's (its exact name; GET /api/v1/sensors lists them)"),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": Problem, "description": "no such session or file"},
    503: {"model": Problem, "description": "the database is unavailable"},
}


def utc(value: datetime | None, name: str) -> datetime | None:
    """A query time as aware UTC (naive means UTC); one that UTC cannot hold is a 422, not a 500."""
    if value is None:
        return None
    try:
        return as_utc(value)
    except (OverflowError, ValueError):
        raise RequestValidationError(
            [{"type": "value_error", "loc": ("query", name), "msg": "time out of range", "input": str(value)}]
        ) from None


def text(value: str | None) -> str | None:
    """A text filter as stored: NUL and lone surrogates as U+FFFD (see :mod:`sandtrap.storage.types`)."""
    return None if value is None else clean(value)


def next_offset(offset: int, limit: int, returned: int, total: int | None = None) -> int | None:
    more = returned == limit if total is None else offset + returned < total
    return offset + returned if more and returned else None


def api_router(deps: ApiDeps) -> APIRouter:
    router = APIRouter(prefix="/api/v1", responses=ERRORS, generate_unique_id_function=lambda route: route.name)
    repo = deps.repository

    def session_or_404(session_id: str) -> SessionDetail:
        detail = repo.get_session(session_id)
        if detail is None:
            raise HTTPException(404, f"no session {session_id}")
        return detail

    @router.get("/sessions", tags=["sessions"])
    def list_sessions(
        since: Since = None,
        until: Until = None,
        src_ip: Annotated[str | None, Query(max_length=64, description="exact source address")] = None,
        username: Annotated[str | None, Query(max_length=MAX_TEXT, description="exact user name logged in")] = None,
        command: Annotated[
            str | None, Query(max_length=MAX_TEXT, description="case-insensitive substring of any command")
        ] = None,
        has_commands: Annotated[bool | None, Query(description="sessions that ran commands (or not)")] = None,
        has_artifacts: Annotated[bool | None, Query(description="sessions that left files (or not)")] = None,
        protocol: Annotated[
            str | None, Query(max_length=16, description="ssh, telnet, tcp or udp (the events' `protocol`)")
        ] = None,
        service: Annotated[str | None, Query(max_length=32, description="the listener's name, e.g. http")] = None,
        sensor: SensorFilter = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 50,
        offset: Offset = 0,
        sort: Annotated[SessionSort, Query(description="a column; '-' first for descending")] = "-started_at",
    ) -> SessionPage:
        """Recorded sessions matching every filter given, a page at a time."""
        filters: dict[str, Any] = {
            "since": utc(since, "since"),
            "until": utc(until, "until"),
            "src_ip": text(src_ip),
            "username": text(username),
            "command": text(command),
            "has_commands": has_commands,
            "has_artifacts": has_artifacts,
            "protocol": text(protocol),
            "service": text(service),
            "sensor": text(sensor),
        }
        items = repo.list_sessions(**filters, limit=limit, offset=offset, sort=sort)
        total = repo.count_sessions(**filters)
        return SessionPage(
            total=total,
            limit=limit,
            offset=offset,
            sort=sort,
            next_offset=next_offset(offset, limit, len(items), total),
            items=items,
        )

    @router.get("/sessions/{session_id}", tags=["sessions"])
    def get_session(session_id: SessionId) -> SessionView:
        """One session in full: client version, HASSH, auth attempts, commands, artifacts, casts, sandbox."""
        detail = session_or_404(session_id)
        is_live = deps.live is not None and deps.live.is_live(session_id)
        pcap = pcap_path(deps.data_dir, session_id)
        return SessionView(**detail.model_dump(), is_live=is_live, pcap_bytes=pcap.stat().st_size if pcap else None)

    @router.get("/sessions/{session_id}/events", tags=["sessions"])
    def session_events(
        session_id: SessionId,
        eventid: Annotated[str | None, Query(max_length=128, description="only events of this id")] = None,
        limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
        offset: Offset = 0,
    ) -> EventPage:
        """The session's events in the order they happened, each as the JSON log has it."""
        items = repo.events(session_id, eventid=text(eventid), limit=limit, offset=offset)
        if not items:
            session_or_404(session_id)
        return EventPage(
            session=session_id,
            limit=limit,
            offset=offset,
            next_offset=next_offset(offset, limit, len(items)),
            items=items,
        )

    @router.get(
        "/sessions/{session_id}/cast",
        tags=["sessions"],
        response_class=StreamingResponse,
        responses={200: {"description": "asciicast v2", "content": {"application/x-asciicast": {}}}},
    )
    def session_cast(
        session_id: SessionId,
        channel: Annotated[int | None, Query(ge=0, le=2**31, description="default: the first recording")] = None,
    ) -> StreamingResponse:
        """A terminal recording (asciicast v2) as a download."""
        found = cast_paths(deps.data_dir, session_or_404(session_id).casts, channel)
        if not found:
            raise HTTPException(404, f"session {session_id} has no recording" + ("" if channel is None else " there"))
        cast, path = found[0]
        name = f"{session_id}-{cast.channel if cast.channel is not None else 0}.cast"
        try:
            return download(path, "application/x-asciicast", name)
        except OSError:
            raise HTTPException(404, f"session {session_id}: recording not readable") from None

    @router.get(
        "/sessions/{session_id}/pcap",
        tags=["sessions"],
        response_class=StreamingResponse,
        responses={200: {"description": "pcap (libpcap 2.4)", "content": {"application/vnd.tcpdump.pcap": {}}}},
    )
    def session_pcap(session_id: SessionId) -> StreamingResponse:
        """What the session's box sent and received on its eth0 (network.mode: capture), as a pcap download."""
        session_or_404(session_id)
        path = pcap_path(deps.data_dir, session_id)
        if path is None:
            raise HTTPException(404, f"session {session_id} has no network capture")
        try:
            return download(path, "application/vnd.tcpdump.pcap", f"{session_id}.pcap")
        except OSError:
            raise HTTPException(404, f"session {session_id}: capture not readable") from None

    @router.get(
        "/sessions/{session_id}/export",
        tags=["sessions"],
        response_class=StreamingResponse,
        responses={200: {"description": "tar.gz", "content": {"application/gzip": {}}}},
    )
    def session_export(session_id: SessionId) -> StreamingResponse:
        """Metadata, events, casts and artifacts of the session as one tar.gz."""
        detail = session_or_404(session_id)
        return export_download(detail, repo.events(session_id), deps.data_dir)

    @router.get(
        "/artifacts/{sha256}",
        tags=["artifacts"],
        response_class=StreamingResponse,
        responses={
            200: {
                "description": "the file, as an attachment",
                "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
            }
        },
    )
    def get_artifact(sha256: Sha256) -> StreamingResponse:
        """A stored artifact's bytes: always application/octet-stream, always an attachment."""
        path = artifact_path(deps.data_dir, sha256)
        if path is None:
            raise HTTPException(404, f"no stored artifact {sha256}")
        try:
            return download(path, "application/octet-stream", f"{sha256}.bin")
        except OSError:
            raise HTTPException(404, f"no stored artifact {sha256}") from None

    @router.get("/stats", tags=["stats"])
    def stats(
        top: Annotated[int, Query(ge=1, le=1000, description="how many of each")] = 10,
        since: Since = None,
        until: Until = None,
        hours: Annotated[int, Query(ge=1, le=24 * 366, description="sessions per hour: the latest N hours")] = 168,
        sensor: SensorFilter = None,
    ) -> Stats:
        """Top usernames, passwords, pairs, source IPs, commands and client versions; sessions per hour."""
        return repo.stats(top, since=utc(since, "since"), until=utc(until, "until"), hours=hours, sensor=text(sensor))

    @router.get("/sensors", tags=["stats"])
    def sensors() -> list[SensorInfo]:
        """Every sensor that recorded a session in this database: sessions, open ones, logins, first and last seen."""
        return repo.sensors()

    return router
