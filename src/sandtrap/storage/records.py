"""What the repository returns: frozen pydantic rows (``model_dump(mode="json")`` is the API's JSON).

Text is as the attacker sent it, except NUL and invalid UTF-8 (stored as U+FFFD): escape it before
showing it on a terminal or a page. Times are aware UTC datetimes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True, from_attributes=True)


class SessionSummary(_Row):
    id: str
    sensor: str
    protocol: str
    service: str = ""
    src_ip: str
    src_port: int
    dst_ip: str
    dst_port: int
    started_at: datetime
    ended_at: datetime | None
    duration_ms: int | None
    close_reason: str | None
    client_version: str | None
    hassh: str | None
    hassh_algorithms: str | None
    key_type: str | None
    key_fingerprint: str | None
    username: str | None
    login_success: bool
    auth_attempts_count: int
    commands_count: int
    artifacts_count: int
    sandbox_id: str | None
    sandbox_name: str | None
    persona: str = ""  # the kind of box it landed in (config personas; '' before it had one)
    bytes_in: int
    bytes_out: int


class AuthAttemptInfo(_Row):
    session: str
    timestamp: datetime
    username: str
    password: str | None
    method: str
    success: bool
    key_type: str | None
    fingerprint: str | None
    fingerprint_sha256: str | None
    key: str | None


class CommandInfo(_Row):
    session: str
    timestamp: datetime
    channel: int | None
    input: str
    source: str


class ArtifactInfo(_Row):
    session: str
    timestamp: datetime
    sha256: str | None
    path: str
    size: int | None
    mode: str | None
    via: str
    kind: str | None
    origin: str | None = None  # a changed file's: attacker, login (the login's bookkeeping) or system (daemons)
    stored: bool
    outfile: str | None


class CastInfo(_Row):
    session: str
    channel: int | None
    path: str
    size: int | None
    sha256: str | None
    opened_at: datetime | None
    closed_at: datetime | None


class SandboxInfo(_Row):
    id: str
    name: str
    session: str | None
    src_ip: str | None
    state: str
    acquired_at: datetime | None
    released_at: datetime | None


class SessionDetail(SessionSummary):
    auth_attempts: list[AuthAttemptInfo]
    commands: list[CommandInfo]
    artifacts: list[ArtifactInfo]
    casts: list[CastInfo]
    sandbox: SandboxInfo | None


class StoredEvent(_Row):
    event_id: str
    session: str | None
    eventid: str
    timestamp: datetime
    data: dict[str, Any]


class SensorInfo(_Row):
    """A sensor as the shared database knows it: from the sessions it recorded."""

    sensor: str
    sessions: int
    open_sessions: int
    logins: int
    first_seen: datetime
    last_seen: datetime


class Count(_Row):
    value: str
    count: int


class PairCount(_Row):
    username: str
    password: str
    count: int


class HourCount(_Row):
    hour: datetime
    count: int


class Stats(_Row):
    sessions: int
    auth_attempts: int
    commands: int
    artifacts: int
    top_usernames: list[Count]
    top_passwords: list[Count]
    top_pairs: list[PairCount]
    top_src_ips: list[Count]
    sessions_per_service: list[Count] = []
    top_commands: list[Count]
    top_client_versions: list[Count]
    sessions_per_hour: list[HourCount]
