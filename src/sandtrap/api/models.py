"""What the API answers beyond the repository's own rows (those are :mod:`sandtrap.storage.records`).

Every string an attacker chose reaches the client as a JSON string: escaped by the encoder, never HTML.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

from sandtrap.storage.records import SessionDetail, SessionSummary, StoredEvent
from sandtrap.storage.repository import SessionSort


class SessionPage(BaseModel):
    """One page of sessions matching the filters."""

    total: int = Field(description="sessions matching the filters, over all pages")
    limit: int
    offset: int
    sort: SessionSort
    next_offset: int | None = Field(description="offset of the next page; null on the last page")
    items: list[SessionSummary]


class SessionView(SessionDetail):
    """One session in full, and whether it can be watched live right now."""

    is_live: bool = Field(description="the session has an open terminal that /live streams")
    pcap_bytes: int | None = Field(
        None, description="the size of the session's network capture (network.mode: capture; /pcap); null: none"
    )


class EventPage(BaseModel):
    session: str
    limit: int
    offset: int
    next_offset: int | None = Field(description="offset of the next page; null on the last page")
    items: list[StoredEvent]


class PoolStatus(BaseModel):
    warm: int
    active: int
    preserved: int
    creating: int
    start_failures: int
    stop_retries: int = 0  # stops that failed at release and were retried in the background
    strays_stopped: int = 0  # running sandboxes nobody tracked, stopped by the periodic sweep


class Health(BaseModel):
    ok: bool
    error: str | None = None


class StorageStatus(Health):
    pending: int | None = Field(None, description="events queued for the database, not stored yet")
    stored: int | None = None
    rejected: int | None = None
    errors: int | None = None
    dropped: int | None = Field(None, description="events dropped from a full buffer (only without a JSON log)")
    is_down: bool | None = None
    down_since: datetime | None = Field(None, description="when the current outage began (UTC); null: none")
    spilling: bool | None = Field(
        None, description="the buffer is full: events go to the JSON log only, to be replayed from it"
    )
    spilled: int | None = Field(None, description="events left to the JSON log while spilling, since start")
    replayed: int | None = Field(None, description="events stored from the JSON log after an outage, since start")
    backlog: int | None = Field(None, description="events left to the JSON log and not replayed yet")
    catch_ups: int | None = Field(None, description="replays from the JSON log finished, since start")


class RecordingStatus(Health):
    """Whether every output writes to the data dir. ``ok`` is false while one of them is failing (its latest
    write failed) or the data dir is nearly full; ``error`` then says which and why (e.g. ``json log: [Errno
    28] No space left on device``)."""

    errors: dict[str, int] = Field(
        description="failed writes since start, per output: jsonlog, casts, artifacts, database "
        "(the database sink's failed attempts and refused events)"
    )
    failing: list[str] = Field(description="outputs whose latest write failed")
    free_bytes: int | None = Field(description="bytes free on the data dir's filesystem; null if unknown")
    low_space: bool = Field(description="free_bytes is below the low-space mark (16 MiB)")


class AlertRuleStatus(BaseModel):
    name: str
    when: str
    matched: int = Field(description="events the rule picked")
    fired: int = Field(description="alerts it made")
    suppressed: int = Field(description="alerts its rate limit held back")


class AlertTargetStatus(BaseModel):
    name: str
    kind: str
    address: str = Field(description="the kind and the URL's host only (a webhook URL's path is a secret)")
    queued: int
    ok: bool = Field(description="false while the latest alert for this target failed")
    last_error: str | None
    sent: int
    failed: int
    dropped: int
    retried: int


class AlertDelivery(BaseModel):
    rule: str
    target: str
    sent: int = Field(description="alerts the target took")
    failed: int = Field(description="alerts given up on after their retries")
    dropped: int = Field(description="alerts that found the target's queue full")
    retried: int = Field(description="attempts after a failed one")


class AlertsStatus(Health):
    """The alerts output: ``ok`` is false while a target's latest alert failed; ``error`` names the targets."""

    rules: list[AlertRuleStatus]
    targets: list[AlertTargetStatus]
    deliveries: list[AlertDelivery]


class Status(BaseModel):
    version: str
    sensor: str
    mode: Literal["honeypot", "console"] = Field(
        description="honeypot: served by `sandtrap run`; console: `sandtrap api`, the storage only"
    )
    uptime_s: float
    pool: PoolStatus | None = Field(description="null in console mode")
    engine: Health | None = Field(description="container engine; null in console mode")
    storage: StorageStatus
    recording: RecordingStatus | None = Field(
        description="write failures of the recording outputs and the data dir's free space; null in console mode"
    )
    alerts: AlertsStatus | None = Field(None, description="alert rules and targets; null in console mode")


class Healthz(BaseModel):
    status: Literal["ok"] = "ok"


class Problem(BaseModel):
    """An error: a short message, never a traceback."""

    detail: str
