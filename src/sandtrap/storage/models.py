"""The database schema: one row per session, with its auth attempts, commands, artifacts, casts and events.

Text an attacker chose is stored as given (:class:`~sandtrap.storage.types.SafeText` only replaces
NUL and lone surrogates). Column names follow the event fields (``session``, ``src_ip``,
``timestamp``). The migrations in ``migrations/versions`` create exactly this schema; a test
compares the two.

Indexes on attacker text: PostgreSQL's btree refuses entries over ~2.7 kB, so equality lookups on
user names and passwords use hash indexes there, and command text a trigram (``pg_trgm``) GIN index
that also serves substring search. SQLite has no such limit and uses plain indexes.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, MetaData, String
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from sandtrap.storage.types import SafeJSON, SafeText, UTCDateTime

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def _session_fk() -> ForeignKey:
    return ForeignKey("sessions.id", ondelete="CASCADE")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class SessionRow(Base):
    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String, primary_key=True, comment="12 hex chars, the events' `session`")
    sensor: Mapped[str] = mapped_column(String, default="")
    protocol: Mapped[str] = mapped_column(String, default="ssh")
    service: Mapped[str] = mapped_column(String, default="", comment="the listener's name (config `services`)")
    src_ip: Mapped[str] = mapped_column(String, default="")
    src_port: Mapped[int] = mapped_column(Integer, default=0)
    dst_ip: Mapped[str] = mapped_column(String, default="")
    dst_port: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    duration_ms: Mapped[int | None] = mapped_column(BigInteger)
    close_reason: Mapped[str | None] = mapped_column(SafeText)
    client_version: Mapped[str | None] = mapped_column(SafeText)
    hassh: Mapped[str | None] = mapped_column(String)
    hassh_algorithms: Mapped[str | None] = mapped_column(SafeText)
    key_type: Mapped[str | None] = mapped_column(SafeText, comment="last public key offered")
    key_fingerprint: Mapped[str | None] = mapped_column(String, comment="MD5, colon-separated hex")
    username: Mapped[str | None] = mapped_column(SafeText, comment="last successful login")
    login_success: Mapped[bool] = mapped_column(Boolean, default=False)
    auth_attempts_count: Mapped[int] = mapped_column(Integer, default=0)
    commands_count: Mapped[int] = mapped_column(Integer, default=0)
    artifacts_count: Mapped[int] = mapped_column(Integer, default=0)
    sandbox_id: Mapped[str | None] = mapped_column(String)
    sandbox_name: Mapped[str | None] = mapped_column(String)
    persona: Mapped[str] = mapped_column(String, default="", comment="the kind of box (config `personas`)")
    bytes_in: Mapped[int] = mapped_column(BigInteger, default=0)
    bytes_out: Mapped[int] = mapped_column(BigInteger, default=0)

    __table_args__ = (
        Index(None, "started_at"),
        Index(None, "src_ip"),
        Index(None, "username", postgresql_using="hash"),
        Index(None, "service"),
        Index(None, "sensor", "started_at"),  # a fleet's console filters by sensor
    )


class AuthAttemptRow(Base):
    __tablename__ = "auth_attempts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session: Mapped[str] = mapped_column(String, _session_fk())
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    username: Mapped[str] = mapped_column(SafeText)
    password: Mapped[str | None] = mapped_column(SafeText)
    method: Mapped[str] = mapped_column(String)
    success: Mapped[bool] = mapped_column(Boolean)
    key_type: Mapped[str | None] = mapped_column(SafeText)
    fingerprint: Mapped[str | None] = mapped_column(String)
    fingerprint_sha256: Mapped[str | None] = mapped_column(String)
    key: Mapped[str | None] = mapped_column(SafeText)

    __table_args__ = (
        Index(None, "session", "timestamp"),
        Index(None, "username", postgresql_using="hash"),
        Index(None, "password", postgresql_using="hash"),
    )


class CommandRow(Base):
    __tablename__ = "commands"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session: Mapped[str] = mapped_column(String, _session_fk())
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    channel: Mapped[int | None] = mapped_column(Integer)
    input: Mapped[str] = mapped_column(SafeText)
    source: Mapped[str] = mapped_column(String, comment="'exec' or 'tty'")

    __table_args__ = (
        Index(None, "session", "timestamp"),
        Index(None, "input", postgresql_using="gin", postgresql_ops={"input": "gin_trgm_ops"}),
    )


class EventRow(Base):
    __tablename__ = "events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String, unique=True)
    session: Mapped[str | None] = mapped_column(String, comment="no foreign key: sensor-wide events have none")
    eventid: Mapped[str] = mapped_column(String)
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    data: Mapped[dict[str, Any]] = mapped_column(SafeJSON, comment="the event as the JSON log has it")

    __table_args__ = (Index(None, "session", "timestamp"),)


class ArtifactRow(Base):
    __tablename__ = "artifacts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session: Mapped[str] = mapped_column(String, _session_fk())
    timestamp: Mapped[datetime] = mapped_column(UTCDateTime)
    sha256: Mapped[str | None] = mapped_column(String)
    path: Mapped[str] = mapped_column(SafeText, comment="the file's name or path in the sandbox")
    size: Mapped[int | None] = mapped_column(BigInteger)
    mode: Mapped[str | None] = mapped_column(String)
    via: Mapped[str] = mapped_column(String, comment="'sftp', 'scp' or 'changed'")
    kind: Mapped[str | None] = mapped_column(String, comment="what changed: e.g. 'added', 'modified'")
    origin: Mapped[str | None] = mapped_column(
        String, comment="a changed file's: 'attacker', 'login' or 'system'; NULL for uploads and older rows"
    )
    stored: Mapped[bool] = mapped_column(Boolean, default=False)
    outfile: Mapped[str | None] = mapped_column(SafeText, comment="where the content is kept on the sensor")

    __table_args__ = (Index(None, "session"), Index(None, "sha256"))


class CastRow(Base):
    __tablename__ = "casts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    session: Mapped[str] = mapped_column(String, _session_fk())
    channel: Mapped[int | None] = mapped_column(Integer)
    path: Mapped[str] = mapped_column(SafeText)
    size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String)
    opened_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    closed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "session"),)


class SandboxRow(Base):
    __tablename__ = "sandboxes"

    id: Mapped[str] = mapped_column(String, primary_key=True, comment="the backend's id (container id)")
    name: Mapped[str] = mapped_column(String, default="")
    session: Mapped[str | None] = mapped_column(String, comment="the session that acquired it")
    src_ip: Mapped[str | None] = mapped_column(String)
    state: Mapped[str] = mapped_column(String, comment="'assigned' or 'released'")
    acquired_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    released_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    __table_args__ = (Index(None, "session"),)
