"""Events into rows: a table from event id to a small function that updates the rows that id concerns.

Every event also goes into ``events`` whole (its JSON-log form), keyed by its unique ``event_id``:
an event already stored is skipped, so replaying a batch or a JSON log changes nothing. Handlers
tolerate any order and gaps (an event whose session row is missing creates a stub from the
envelope), because a batch dropped during an outage may come back later from the JSON log.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from sandtrap import events as ev
from sandtrap.events import Event, cowrie_dict
from sandtrap.storage.models import ArtifactRow, AuthAttemptRow, CastRow, CommandRow, EventRow, SandboxRow, SessionRow
from sandtrap.storage.types import as_utc, clean

Handler = Callable[[Session, Event], None]
CRASH = "crash"


_SESSIONS = "sandtrap_session_rows"  # db.info key: the batch's session rows by id
_BATCH = "sandtrap_batch_events"  # db.info key: the batch's event rows not inserted yet


def apply_events(db: Session, events: Sequence[Event]) -> int:
    """Store the events not stored yet, in order; the caller commits. Returns how many were new.

    One query finds the batch's known events and one its sessions; the handlers then work on those
    rows without a query each (no autoflush), and the events go in as one multi-row insert.
    """
    known = set(db.scalars(select(EventRow.event_id).where(EventRow.event_id.in_({e.event_id for e in events}))))
    ids = {e.session for e in events if e.session}
    rows: list[dict[str, Any]] = []
    with db.no_autoflush:
        found = list(db.scalars(select(SessionRow).where(SessionRow.id.in_(ids)))) if ids else []
        cache = {row.id: row for row in found}
        # Sessions this batch starts: their rows go in with one flush, before any row that references them.
        for event in events:
            if event.session and event.session not in cache and event.event_id not in known:
                cache[event.session] = _stub(event)
                db.add(cache[event.session])
        if len(cache) > len(found):
            db.flush()
        db.info[_SESSIONS] = cache
        db.info[_BATCH] = rows
        try:
            for event in events:
                if event.event_id in known:
                    continue
                known.add(event.event_id)
                rows.append(
                    {
                        "event_id": event.event_id,
                        "session": event.session or None,
                        "eventid": event.eventid,
                        "timestamp": _ts(event),
                        "data": cowrie_dict(event),
                    }
                )
                handler = HANDLERS.get(event.eventid)
                if handler is not None and (event.session or event.eventid in SESSIONLESS):
                    if event.eventid in QUERYING:
                        db.flush()  # the handler looks rows up: those of this batch must be there
                    handler(db, event)
        finally:
            db.info.pop(_SESSIONS, None)
            db.info.pop(_BATCH, None)
    if rows:
        db.flush()
        db.execute(insert(EventRow), rows)
    return len(rows)


# -- reading fields defensively (events replayed from a log file may carry anything) ----------------------
def _ts(event: Event) -> datetime:
    return as_utc(event.timestamp)


def _str(event: Event, name: str) -> str | None:
    value = event.get(name)
    return None if value is None else str(value)


def _int(event: Event, name: str) -> int | None:
    value = event.get(name)
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _mode(value: Any) -> str | None:
    if value is None:
        return None
    return f"{value:04o}" if isinstance(value, int) and not isinstance(value, bool) else str(value)


def _ms(start: datetime, end: datetime) -> int:
    return max(0, round((end - start).total_seconds() * 1000))


def _duration_ms(event: Event) -> int | None:
    ms = _int(event, "duration_ms")
    if ms is not None:
        return ms
    try:
        return round(float(event.get("duration")) * 1000)
    except (TypeError, ValueError):
        return None


def _session(db: Session, event: Event) -> SessionRow:
    """The event's session row; a stub made from the envelope when the connect event is missing."""
    cache: dict[str, SessionRow] | None = db.info.get(_SESSIONS)
    row = cache.get(event.session) if cache is not None else db.get(SessionRow, event.session)
    if row is None:
        row = _stub(event)
        db.add(row)
        db.flush()  # child rows of this batch reference it
        if cache is not None:
            cache[row.id] = row
    return row


def _stub(event: Event) -> SessionRow:
    """A session row from an event's envelope (the connect event, or any when that one is missing)."""
    return SessionRow(
        id=event.session,
        sensor=event.sensor,
        protocol=event.protocol or "ssh",
        service=str(event.get("service") or event.protocol or "ssh"),
        src_ip=event.src_ip,
        src_port=event.src_port,
        dst_ip=event.dst_ip,
        dst_port=event.dst_port,
        started_at=_ts(event),
        login_success=False,
        auth_attempts_count=0,
        commands_count=0,
        artifacts_count=0,
        bytes_in=0,
        bytes_out=0,
    )


# -- the handlers ------------------------------------------------------------------------------------------
def _connect(db: Session, e: Event) -> None:
    row = _session(db, e)
    row.sensor = e.sensor or row.sensor
    row.protocol = e.protocol or row.protocol
    row.service = str(e.get("service") or row.service or row.protocol)
    row.src_ip, row.src_port = e.src_ip or row.src_ip, e.src_port or row.src_port
    row.dst_ip, row.dst_port = e.dst_ip or row.dst_ip, e.dst_port or row.dst_port
    row.started_at = min(row.started_at, _ts(e))


def _client_version(db: Session, e: Event) -> None:
    _session(db, e).client_version = _str(e, "version")


def _client_kex(db: Session, e: Event) -> None:
    row = _session(db, e)
    row.hassh = _str(e, "hassh")
    row.hassh_algorithms = _str(e, "hasshAlgorithms")


def _client_fingerprint(db: Session, e: Event) -> None:
    row = _session(db, e)
    row.key_type = _str(e, "type")
    row.key_fingerprint = _str(e, "fingerprint")


def _login(db: Session, e: Event) -> None:
    row = _session(db, e)
    success = e.eventid == ev.LOGIN_SUCCESS
    username = _str(e, "username") or ""
    method = _str(e, "method") or ("publickey" if e.get("fingerprint") else "password")
    offered = method == "publickey"  # the key details may only be on the client.fingerprint before it
    db.add(
        AuthAttemptRow(
            session=row.id,
            timestamp=_ts(e),
            username=username,
            password=_str(e, "password"),
            method=method,
            success=success,
            key_type=_str(e, "type") or (row.key_type if offered else None),
            fingerprint=_str(e, "fingerprint") or (row.key_fingerprint if offered else None),
            fingerprint_sha256=_str(e, "fingerprint_sha256"),
            key=_str(e, "key"),
        )
    )
    row.auth_attempts_count += 1
    if success:
        row.username = username
        row.login_success = True


def _command(db: Session, e: Event) -> None:
    row = _session(db, e)
    text = _str(e, "input") or ""
    channel = _int(e, "channel")
    source = e.get("source")
    if source not in ("exec", "tty"):
        source = _source(db, e.session, channel, text)
    db.add(CommandRow(session=row.id, timestamp=_ts(e), channel=channel, input=text, source=source))
    row.commands_count += 1


def _source(db: Session, session: str, channel: int | None, text: str) -> str:
    """'exec' when the channel ran this command as an exec request, else 'tty' (typed in a shell)."""
    execs = list(
        db.scalars(select(EventRow.data).where(EventRow.session == session, EventRow.eventid == ev.CHANNEL_EXEC))
    )
    batch: list[dict[str, Any]] = db.info.get(_BATCH) or []
    execs += [r["data"] for r in batch if r["session"] == session and r["eventid"] == ev.CHANNEL_EXEC]
    for data in execs:
        if (channel is not None and data.get("channel") == channel) or (
            channel is None and data.get("input") == clean(text)
        ):
            return "exec"
    return "tty"


def _sandbox_assigned(db: Session, e: Event) -> None:
    row = _session(db, e)
    sandbox_id, name = _str(e, "sandbox_id"), _str(e, "sandbox_name")
    row.sandbox_id, row.sandbox_name = sandbox_id, name
    row.persona = _str(e, "persona") or row.persona or ""
    if not sandbox_id:
        return
    box = db.get(SandboxRow, sandbox_id)
    if box is None:  # reused boxes (source_ip affinity) keep the session that acquired them first
        box = SandboxRow(id=sandbox_id, session=e.session, src_ip=e.src_ip or None, state="assigned")
        db.add(box)
    box.name = name or box.name or ""
    box.acquired_at = box.acquired_at or _ts(e)


def _sandbox_released(db: Session, e: Event) -> None:
    sandbox_id = _str(e, "sandbox_id")
    if not sandbox_id:
        return
    box = db.get(SandboxRow, sandbox_id)
    if box is None:
        box = SandboxRow(id=sandbox_id, session=e.session or None, src_ip=e.src_ip or None, state="released")
        db.add(box)
    box.name = _str(e, "sandbox_name") or box.name or ""
    box.state = "released"
    box.released_at = _ts(e)


def _cast(db: Session, e: Event) -> CastRow:
    """The cast of the event's channel (one per channel; by path when the event names no channel)."""
    path, channel = _str(e, "ttylog") or "", _int(e, "channel")
    query = select(CastRow).where(CastRow.session == e.session)
    query = query.where(CastRow.channel == channel) if channel is not None else query.where(CastRow.path == path)
    cast = db.scalars(query.order_by(CastRow.id).limit(1)).first()
    if cast is None:
        cast = CastRow(session=_session(db, e).id, channel=channel, path=path)
        db.add(cast)
    cast.path = path or cast.path
    return cast


def _log_open(db: Session, e: Event) -> None:
    _cast(db, e).opened_at = _ts(e)


def _log_closed(db: Session, e: Event) -> None:
    cast = _cast(db, e)
    cast.size = _int(e, "size")
    cast.sha256 = _str(e, "shasum") or None
    cast.closed_at = _ts(e)


def _artifact(db: Session, e: Event, via: str, path: str = "") -> None:
    row = _session(db, e)
    outfile = _str(e, "outfile") or None  # "" when the content was not kept
    db.add(
        ArtifactRow(
            session=row.id,
            timestamp=_ts(e),
            sha256=_str(e, "shasum") or None,
            path=_str(e, "destfile") or _str(e, "filename") or path,
            size=_int(e, "size"),
            mode=_mode(e.get("mode")),
            via=via,
            kind=_str(e, "kind"),
            origin=_str(e, "origin"),
            stored=bool(e.get("stored", bool(outfile))),
            outfile=outfile,
        )
    )
    if _str(e, "origin") in (None, "attacker"):  # the login's bookkeeping is not the attacker's artifact
        row.artifacts_count += 1


def _file_upload(db: Session, e: Event) -> None:
    _artifact(db, e, _str(e, "via") or "upload")


def _file_download(db: Session, e: Event) -> None:
    """A file the box fetched through the capture gateway: its URL stands for the path (where the box saved it
    shows as a changed file)."""
    _artifact(db, e, "download", _str(e, "url") or "")


def _file_changed(db: Session, e: Event) -> None:
    _artifact(db, e, "changed")


def _bytes(row: SessionRow, e: Event) -> None:
    """Byte counts are per connection and only grow: keep the largest seen."""
    row.bytes_in = max(row.bytes_in, _int(e, "bytes_in") or 0)
    row.bytes_out = max(row.bytes_out, _int(e, "bytes_out") or 0)


def _channel_closed(db: Session, e: Event) -> None:
    _bytes(_session(db, e), e)


def _session_closed(db: Session, e: Event) -> None:
    row = _session(db, e)
    row.ended_at = _ts(e)
    duration = _duration_ms(e)
    row.duration_ms = duration if duration is not None else _ms(row.started_at, row.ended_at)
    row.close_reason = _str(e, "reason") or row.close_reason
    _bytes(row, e)


def _session_crashed(db: Session, e: Event) -> None:
    row = _session(db, e)
    if row.ended_at is None:
        row.ended_at = _ts(e)
        row.duration_ms = _ms(row.started_at, row.ended_at)
        row.close_reason = CRASH


HANDLERS: dict[str, Handler] = {
    ev.SESSION_CONNECT: _connect,
    ev.CLIENT_VERSION: _client_version,
    ev.CLIENT_KEX: _client_kex,
    ev.CLIENT_FINGERPRINT: _client_fingerprint,
    ev.LOGIN_SUCCESS: _login,
    ev.LOGIN_FAILED: _login,
    ev.COMMAND_INPUT: _command,
    ev.SANDBOX_ASSIGNED: _sandbox_assigned,
    ev.SANDBOX_RELEASED: _sandbox_released,
    ev.LOG_OPEN: _log_open,
    ev.LOG_CLOSED: _log_closed,
    ev.SESSION_FILE_UPLOAD: _file_upload,
    ev.SESSION_FILE_CHANGED: _file_changed,
    ev.SESSION_FILE_DOWNLOAD: _file_download,
    ev.CHANNEL_CLOSED: _channel_closed,
    ev.SESSION_CLOSED: _session_closed,
    ev.SESSION_CRASHED: _session_crashed,
}
# Ids whose handler looks rows up (the rest only touch the batch's session rows): pending rows are flushed first.
QUERYING = frozenset(
    {ev.COMMAND_INPUT, ev.SANDBOX_ASSIGNED, ev.SANDBOX_RELEASED, ev.LOG_OPEN, ev.LOG_CLOSED, ev.CHANNEL_CLOSED}
)
# Ids whose handler makes sense without a session (the pool may release a box on its own).
SESSIONLESS = frozenset({ev.SANDBOX_RELEASED})
