"""The read side for the CLI and the API: sessions with filters, one session in full, its events, statistics.

Rows come back as the frozen pydantic models of :mod:`sandtrap.storage.records`. Text is as the
attacker sent it, except NUL and invalid UTF-8, stored as U+FFFD (see :mod:`sandtrap.storage.types`):
escape it before showing it on a terminal or a page. Database errors leave as ``StorageError``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, Literal, ParamSpec, TypeVar

from sqlalchemy import ColumnElement, exists, func, literal_column, or_, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from sandtrap.storage.engine import StorageError, describe, make_engine
from sandtrap.storage.ingest import CRASH
from sandtrap.storage.models import ArtifactRow, AuthAttemptRow, CastRow, CommandRow, EventRow, SandboxRow, SessionRow
from sandtrap.storage.records import (
    ArtifactInfo,
    AuthAttemptInfo,
    CastInfo,
    CommandInfo,
    Count,
    HourCount,
    PairCount,
    SandboxInfo,
    SensorInfo,
    SessionDetail,
    SessionSummary,
    Stats,
    StoredEvent,
)
from sandtrap.storage.types import as_utc

SessionSort = Literal[
    "started_at",
    "-started_at",
    "duration_ms",
    "-duration_ms",
    "commands_count",
    "-commands_count",
    "src_ip",
    "-src_ip",
]
MAX_LIMIT = 10_000
P = ParamSpec("P")
R = TypeVar("R")


def like_pattern(text: str) -> str:
    """A LIKE pattern matching ``text`` anywhere, with LIKE's own wildcards taken literally."""
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def _storage_errors(method: Callable[P, R]) -> Callable[P, R]:
    """Database errors leave the repository as StorageError (the API answers 503 for it)."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except SQLAlchemyError as exc:
            raise StorageError(f"database error: {describe(exc)}") from exc

    return wrapper


class Repository:
    """Reads (and the start-up's crash closing). Blocking: from async code, call through a thread."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- sessions ---------------------------------------------------------------------------------------
    @_storage_errors
    def list_sessions(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        src_ip: str | None = None,
        username: str | None = None,
        command: str | None = None,
        has_commands: bool | None = None,
        has_artifacts: bool | None = None,
        protocol: str | None = None,
        service: str | None = None,
        sensor: str | None = None,
        limit: int = 50,
        offset: int = 0,
        sort: SessionSort = "-started_at",
    ) -> list[SessionSummary]:
        """Sessions matching every filter given; ``command`` is a case-insensitive substring of any command."""
        where = _session_filters(
            since, until, src_ip, username, command, has_commands, has_artifacts, protocol, service, sensor
        )
        column = getattr(SessionRow, sort.lstrip("-"))
        order = column.desc() if sort.startswith("-") else column.asc()
        tiebreak = SessionRow.id.desc() if sort.startswith("-") else SessionRow.id.asc()
        query = (
            select(SessionRow)
            .where(*where)
            .order_by(order.nulls_last(), tiebreak)
            .limit(max(0, min(limit, MAX_LIMIT)))
            .offset(max(0, offset))
        )
        with self._sessions() as db:
            return [SessionSummary.model_validate(row) for row in db.scalars(query)]

    @_storage_errors
    def count_sessions(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        src_ip: str | None = None,
        username: str | None = None,
        command: str | None = None,
        has_commands: bool | None = None,
        has_artifacts: bool | None = None,
        protocol: str | None = None,
        service: str | None = None,
        sensor: str | None = None,
    ) -> int:
        where = _session_filters(
            since, until, src_ip, username, command, has_commands, has_artifacts, protocol, service, sensor
        )
        with self._sessions() as db:
            return db.scalar(select(func.count()).select_from(SessionRow).where(*where)) or 0

    @_storage_errors
    def get_session(self, session_id: str) -> SessionDetail | None:
        with self._sessions() as db:
            row = db.get(SessionRow, session_id)
            if row is None:
                return None

            def children(model: Any, order: Any) -> Sequence[Any]:
                return db.scalars(
                    select(model).where(model.session == session_id).order_by(order.nulls_last(), model.id)
                ).all()

            sandbox = db.get(SandboxRow, row.sandbox_id) if row.sandbox_id else None
            return SessionDetail(
                **SessionSummary.model_validate(row).model_dump(),
                auth_attempts=[
                    AuthAttemptInfo.model_validate(r) for r in children(AuthAttemptRow, AuthAttemptRow.timestamp)
                ],
                commands=[CommandInfo.model_validate(r) for r in children(CommandRow, CommandRow.timestamp)],
                artifacts=[ArtifactInfo.model_validate(r) for r in children(ArtifactRow, ArtifactRow.timestamp)],
                casts=[CastInfo.model_validate(r) for r in children(CastRow, CastRow.opened_at)],
                sandbox=SandboxInfo.model_validate(sandbox) if sandbox is not None else None,
            )

    @_storage_errors
    def events(
        self, session_id: str, *, eventid: str | None = None, limit: int | None = None, offset: int = 0
    ) -> list[StoredEvent]:
        """The session's events in the order they happened, each as the JSON log has it."""
        query = select(EventRow).where(EventRow.session == session_id)
        if eventid is not None:
            query = query.where(EventRow.eventid == eventid)
        query = query.order_by(EventRow.timestamp, EventRow.id).offset(max(0, offset))
        if limit is not None:
            query = query.limit(max(0, limit))
        with self._sessions() as db:
            return [StoredEvent.model_validate(row) for row in db.scalars(query)]

    @_storage_errors
    def has_event(self, event_id: str) -> bool:
        with self._sessions() as db:
            return db.scalar(select(exists().where(EventRow.event_id == event_id))) or False

    # -- statistics -------------------------------------------------------------------------------------
    @_storage_errors
    def stats(
        self,
        top: int = 10,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        hours: int = 168,
        sensor: str | None = None,
    ) -> Stats:
        """Totals, the ``top`` most frequent of each kind (ties by value), and sessions per UTC hour.

        ``sessions_per_hour`` lists the latest ``hours`` hours that have sessions, oldest first;
        hours without sessions are left out (the display fills them). ``sensor``: that sensor's only.
        """
        of_sensor = select(SessionRow.id).where(SessionRow.sensor == sensor).scalar_subquery()

        def window(column: Any) -> list[ColumnElement[bool]]:
            where = [
                c for c in (column >= since if since else None, column < until if until else None) if c is not None
            ]
            if sensor is not None:
                model = column.class_
                where.append(model.sensor == sensor if model is SessionRow else model.session.in_(of_sensor))
            return where

        def ranked(column: Any, *where: ColumnElement[bool]) -> list[Count]:
            n = func.count().label("n")
            query = select(column, n).where(column.is_not(None), *where).group_by(column).order_by(n.desc(), column)
            return [Count(value=value, count=count) for value, count in db.execute(query.limit(top))]

        def total(model: Any, column: Any) -> int:
            return db.scalar(select(func.count()).select_from(model).where(*window(column))) or 0

        attempts_in = window(AuthAttemptRow.timestamp)
        with self._sessions() as db:
            n = func.count().label("n")
            pairs = (
                select(AuthAttemptRow.username, AuthAttemptRow.password, n)
                .where(AuthAttemptRow.password.is_not(None), *attempts_in)
                .group_by(AuthAttemptRow.username, AuthAttemptRow.password)
                .order_by(n.desc(), AuthAttemptRow.username, AuthAttemptRow.password)
                .limit(top)
            )
            hour = _hour_bucket(db, SessionRow.started_at).label("hour")
            per_hour = (
                select(hour, func.count())
                .where(*window(SessionRow.started_at))
                .group_by(hour)
                .order_by(hour.desc())
                .limit(hours)
            )
            return Stats(
                sessions=total(SessionRow, SessionRow.started_at),
                auth_attempts=total(AuthAttemptRow, AuthAttemptRow.timestamp),
                commands=total(CommandRow, CommandRow.timestamp),
                artifacts=total(ArtifactRow, ArtifactRow.timestamp),
                top_usernames=ranked(AuthAttemptRow.username, *attempts_in),
                top_passwords=ranked(AuthAttemptRow.password, *attempts_in),
                top_pairs=[PairCount(username=u, password=p, count=c) for u, p, c in db.execute(pairs)],
                top_src_ips=ranked(SessionRow.src_ip, *window(SessionRow.started_at)),
                sessions_per_service=ranked(SessionRow.service, *window(SessionRow.started_at)),
                top_commands=ranked(CommandRow.input, *window(CommandRow.timestamp)),
                top_client_versions=ranked(SessionRow.client_version, *window(SessionRow.started_at)),
                sessions_per_hour=sorted(
                    (HourCount(hour=_as_hour(h), count=c) for h, c in db.execute(per_hour)), key=lambda x: x.hour
                ),
            )

    @_storage_errors
    def sensors(self) -> list[SensorInfo]:
        """Every sensor that recorded a session: its sessions (open ones, logins), first and last seen (its
        first session's start; its latest session start or end)."""
        last = func.max(func.coalesce(SessionRow.ended_at, SessionRow.started_at))
        query = (
            select(
                SessionRow.sensor,
                func.count(),
                func.count(SessionRow.id).filter(SessionRow.ended_at.is_(None)),
                func.count(SessionRow.id).filter(SessionRow.login_success.is_(True)),
                func.min(SessionRow.started_at),
                func.max(SessionRow.started_at),
                last,
            )
            .group_by(SessionRow.sensor)
            .order_by(SessionRow.sensor)
        )
        with self._sessions() as db:
            return [
                SensorInfo(
                    sensor=name,
                    sessions=n,
                    open_sessions=n_open,
                    logins=n_login,
                    first_seen=as_utc(first),
                    last_seen=max(as_utc(latest_start), as_utc(latest)),
                )
                for name, n, n_open, n_login, first, latest_start, latest in db.execute(query)
            ]

    # -- maintenance ------------------------------------------------------------------------------------
    @_storage_errors
    def close_crashed_sessions(self, now: datetime, sensor: str | None = None) -> list[str]:
        """Close sessions a previous run left open (``close_reason='crash'``); returns their ids.

        Call at start-up, before accepting connections (and after catching up from the JSON log, so
        sessions that did close are not taken for crashed). ``sensor`` limits it to this sensor's
        sessions when several sensors share one database.
        """
        now = as_utc(now)
        with self._sessions() as db, db.begin():
            query = select(SessionRow).where(SessionRow.ended_at.is_(None))
            if sensor is not None:
                query = query.where(SessionRow.sensor == sensor)
            rows = db.scalars(query.order_by(SessionRow.started_at, SessionRow.id).with_for_update()).all()
            for row in rows:
                # The session ended when it was last heard of (its last event), not at the restart.
                last = db.scalar(select(func.max(EventRow.timestamp)).where(EventRow.session == row.id))
                ended = as_utc(last) if last is not None else now
                db.execute(
                    update(SessionRow)
                    .where(SessionRow.id == row.id, SessionRow.ended_at.is_(None))
                    .values(
                        ended_at=ended,
                        close_reason=CRASH,
                        duration_ms=max(0, round((ended - as_utc(row.started_at)).total_seconds() * 1000)),
                    )
                )
            return [row.id for row in rows]


def _session_filters(
    since: datetime | None,
    until: datetime | None,
    src_ip: str | None,
    username: str | None,
    command: str | None,
    has_commands: bool | None,
    has_artifacts: bool | None,
    protocol: str | None = None,
    service: str | None = None,
    sensor: str | None = None,
) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if sensor is not None:
        where.append(SessionRow.sensor == sensor)
    if protocol:
        where.append(SessionRow.protocol == protocol)
    if service:
        where.append(SessionRow.service == service)
    if since is not None:
        where.append(SessionRow.started_at >= since)
    if until is not None:
        where.append(SessionRow.started_at < until)
    if src_ip:
        where.append(SessionRow.src_ip == src_ip)
    if username is not None:
        where.append(SessionRow.username == username)
    if command:
        where.append(
            exists().where(
                CommandRow.session == SessionRow.id, CommandRow.input.ilike(like_pattern(command), escape="\\")
            )
        )
    if has_commands is not None:
        where.append(SessionRow.commands_count > 0 if has_commands else SessionRow.commands_count == 0)
    if has_artifacts is not None:
        # The attacker's files: the login's bookkeeping and the box's daemons' churn are in every session.
        mine = or_(ArtifactRow.origin.is_(None), ArtifactRow.origin == "attacker")
        has = exists().where(ArtifactRow.session == SessionRow.id, mine)
        where.append(has if has_artifacts else ~has)
    return where


def _hour_bucket(db: Session, column: Any) -> ColumnElement[Any]:
    if db.get_bind().dialect.name == "postgresql":
        return func.date_trunc(literal_column("'hour'"), func.timezone(literal_column("'UTC'"), column))
    return func.strftime(literal_column("'%Y-%m-%d %H:00:00'"), column)


def _as_hour(value: datetime | str) -> datetime:
    return as_utc(datetime.fromisoformat(value) if isinstance(value, str) else value)
