"""`sandtrap sessions ...` and `sandtrap stats`: read what was recorded, from the command line.

Attacker text is shown as text: rich markup is never interpreted in it, control characters are made
visible, and replay strips the escape sequences that talk back to the terminal (OSC, DCS, APC, PM).
"""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from sandtrap.api.files import cast_paths, write_export
from sandtrap.cli_config import ConfigOption, remember, settings
from sandtrap.config import Settings
from sandtrap.errors import SandtrapError
from sandtrap.storage.engine import shown_url
from sandtrap.storage.migrate import is_migrated
from sandtrap.storage.records import ArtifactInfo, SessionDetail
from sandtrap.storage.repository import Repository

sessions_app = typer.Typer(help="List, show, replay and export recorded sessions.", no_args_is_help=True)
out = Console()
err = Console(stderr=True)

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
# Escape sequences that make a terminal answer, write the clipboard or change its title: dropped on replay.
_TALKBACK = re.compile(r"\x1b[\]P_^X][^\x07\x1b]*(?:\x07|\x1b\\)?|[\x90\x9d\x9e\x9f][^\x07\x9c]*[\x07\x9c]?")


def visible(text: str | None, limit: int = 200) -> Text:
    """Attacker text for a table cell: no markup, control characters shown as escapes."""
    if text is None:
        return Text("-", style="dim")
    shown = _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
    if len(shown) > limit:
        shown = shown[: limit - 1] + "…"
    return Text(shown)


def parse_since(value: str | None) -> datetime | None:
    """``30m``, ``2h``, ``7d`` ago, or an ISO date/time (UTC if no zone)."""
    if not value:
        return None
    m = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if m:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[m.group(2)]
        return datetime.now(UTC) - timedelta(**{unit: int(m.group(1))})
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{value!r}: use e.g. 30m, 2h, 7d or 2026-11-22T08:00") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def strip_talkback(text: str) -> str:
    return _TALKBACK.sub("", text)


@sessions_app.callback()
def sessions_options(config: ConfigOption = None) -> None:
    remember(config)


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(Text("error: ", style="bold red") + Text(message), soft_wrap=True)
    return typer.Exit(code)


def _nothing_recorded(s: Settings) -> str | None:
    """Why there is nothing to read (no database yet, or one without sandtrap's tables), or None."""
    try:
        if is_migrated(s.database_url):
            return None
    except SandtrapError as exc:
        raise _fail(str(exc)) from None
    return f"nothing recorded yet in {shown_url(s.database_url)}"


def _when(value: datetime | None) -> str:
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S") if value else "-"


@sessions_app.command("list")
def list_sessions(
    since: Annotated[str | None, typer.Option(help="30m, 2h, 7d or an ISO time")] = None,
    src_ip: Annotated[str | None, typer.Option("--src-ip", help="exact source address")] = None,
    username: Annotated[str | None, typer.Option(help="exact user name")] = None,
    command: Annotated[str | None, typer.Option(help="substring of any command")] = None,
    has_commands: Annotated[bool, typer.Option("--has-commands", help="only sessions that ran commands")] = False,
    service: Annotated[str | None, typer.Option(help="the listener's name (ssh, telnet, http, ...)")] = None,
    sensor: Annotated[str | None, typer.Option(help="only this sensor's (a fleet sharing one database)")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="JSON lines instead of a table")] = False,
    config: ConfigOption = None,
) -> None:
    """Recorded sessions, newest first."""
    s = settings(config)
    when = parse_since(since)
    why = _nothing_recorded(s)
    if why:  # no sessions: said on stderr with --json (no lines on stdout), else in place of the table
        (err if as_json else out).print(Text(f"no sessions: {why}"), soft_wrap=True)
        return
    try:
        with Repository(s.database_url) as repo:
            rows = repo.list_sessions(
                since=when,
                src_ip=src_ip,
                username=username,
                command=command,
                has_commands=True if has_commands else None,
                service=service,
                sensor=sensor,
                limit=limit,
            )
    except SandtrapError as exc:
        raise _fail(str(exc)) from None
    if as_json:
        for row in rows:
            sys.stdout.write(row.model_dump_json() + "\n")
        return
    table = Table(title=f"sessions ({len(rows)})")
    table.add_column("session", no_wrap=True, min_width=12)
    table.add_column("started (UTC)", no_wrap=True)
    several = len({r.sensor for r in rows}) > 1  # a fleet's rows: say whose
    for col in ("sensor",) * several + ("source", "service", "user", "login", "cmds", "files", "duration", "closed"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r.id,
            _when(r.started_at),
            *([visible(r.sensor, 32)] if several else []),
            f"{r.src_ip}:{r.src_port}",
            visible(r.service or r.protocol, 32),
            visible(r.username, 32),
            "yes" if r.login_success else "no",
            str(r.commands_count),
            str(r.artifacts_count),
            f"{(r.duration_ms or 0) / 1000:.1f}s" if r.ended_at else "open",
            visible(r.close_reason, 24),
        )
    out.print(table)


def _load(s: Settings, session_id: str) -> SessionDetail:
    if not re.fullmatch(r"[0-9a-f]{12}", session_id):
        raise _fail(f"{session_id!r} is not a session id (12 hex characters)", 2)
    why = _nothing_recorded(s)
    if why:
        raise _fail(f"no session {session_id}: {why}")
    try:
        with Repository(s.database_url) as repo:
            detail = repo.get_session(session_id)
    except SandtrapError as exc:
        raise _fail(str(exc)) from None
    if detail is None:
        raise _fail(f"no session {session_id}")
    return detail


@sessions_app.command("show")
def show(
    session_id: str, as_json: Annotated[bool, typer.Option("--json")] = False, config: ConfigOption = None
) -> None:
    """One session: metadata, auth attempts, commands, artifacts, recordings."""
    d = _load(settings(config), session_id)
    if as_json:
        sys.stdout.write(d.model_dump_json(indent=2) + "\n")
        return
    meta = Table(show_header=False, title=f"session {d.id}")
    meta.add_column("field", style="bold")
    meta.add_column("value")
    for name, value in (
        ("source", f"{d.src_ip}:{d.src_port}"),
        ("server", f"{d.dst_ip}:{d.dst_port} ({d.sensor})"),
        ("started", _when(d.started_at)),
        ("ended", _when(d.ended_at)),
        ("close reason", d.close_reason),
        ("client", d.client_version),
        ("hassh", d.hassh),
        ("user", d.username),
        ("sandbox", f"{d.sandbox_name or '-'} ({(d.sandbox_id or '-')[:12]})"),
        ("persona", d.persona),
        ("bytes in/out", f"{d.bytes_in}/{d.bytes_out}"),
    ):
        meta.add_row(name, visible(value if isinstance(value, str) else str(value or "-"), 120))
    out.print(meta)
    auth = Table(title=f"auth attempts ({len(d.auth_attempts)})")
    for col in ("time", "method", "user", "password / key", "result"):
        auth.add_column(col)
    for a in d.auth_attempts:
        secret = a.password if a.password is not None else f"{a.key_type or ''} {a.fingerprint or ''}"
        auth.add_row(
            _when(a.timestamp), a.method, visible(a.username, 40), visible(secret, 60), "ok" if a.success else "fail"
        )
    out.print(auth)
    cmds = Table(title=f"commands ({len(d.commands)})")
    for col in ("time", "ch", "how", "input"):
        cmds.add_column(col)
    for c in d.commands:
        cmds.add_row(
            _when(c.timestamp), str(c.channel if c.channel is not None else "-"), c.source, visible(c.input, 300)
        )
    out.print(cmds)
    # The login's bookkeeping and the box's daemons' churn in a table of their own, after the attacker's files.
    mine = [f for f in d.artifacts if f.origin in (None, "attacker")]
    _files(out, f"artifacts ({len(mine)})", mine)
    others = [f for f in d.artifacts if f.origin not in (None, "attacker")]
    if others:
        _files(out, f"login bookkeeping and the box's daemons ({len(others)})", others)
    for rec in d.casts:
        out.print(Text(f"recording: channel {rec.channel}: {rec.path} ({rec.size or 0} bytes)"))


def _files(out: Console, title: str, rows: list[ArtifactInfo]) -> None:
    files = Table(title=title)
    for col in ("how", "path", "size", "sha256", "stored"):
        files.add_column(col)
    for f in rows:
        files.add_row(
            f.via + (f" ({f.kind}, {f.origin})" if f.origin and f.kind else f" ({f.kind})" if f.kind else ""),
            visible(f.path, 80),
            str(f.size if f.size is not None else "-"),
            f.sha256 or "-",
            "yes" if f.stored else "no",
        )
    out.print(files)


def _cast_paths(s: Settings, detail: SessionDetail, channel: int | None) -> list[Path]:
    return [path for _, path in cast_paths(s.data_dir, detail.casts, channel)]


@sessions_app.command("replay")
def replay(
    session_id: str,
    speed: Annotated[float, typer.Option(min=0.01, max=1000.0, help="playback speed factor")] = 1.0,
    channel: Annotated[int | None, typer.Option(help="only this channel")] = None,
    max_wait: Annotated[float, typer.Option(help="longest pause kept between frames, seconds")] = 2.0,
    config: ConfigOption = None,
) -> None:
    """Play a session's terminal recording here, as it happened (talk-back escape sequences removed)."""
    s = settings(config)
    paths = _cast_paths(s, _load(s, session_id), channel)
    if not paths:
        raise _fail(f"session {session_id} has no recording")
    for path in paths:
        last = 0.0
        with path.open(encoding="utf-8") as f:
            next(f, None)  # header
            for line in f:
                try:
                    t, kind, data = json.loads(line)
                except (ValueError, TypeError):
                    continue
                if kind != "o":
                    continue
                delay = min(max(0.0, float(t) - last), max_wait) / speed
                last = float(t)
                if delay > 0:
                    time.sleep(delay)
                sys.stdout.write(strip_talkback(str(data)))
                sys.stdout.flush()
    sys.stdout.write("\r\n")


@sessions_app.command("export")
def export(
    session_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: ./session-<id>.tar.gz")] = None,
    config: ConfigOption = None,
) -> None:
    """A tar.gz with metadata.json, events.jsonl, the casts and the artifacts (never executable)."""
    s = settings(config)
    detail = _load(s, session_id)
    target = output or Path(f"session-{session_id}.tar.gz")
    try:
        with Repository(s.database_url) as repo:
            events = repo.events(session_id)
    except SandtrapError as exc:
        raise _fail(str(exc)) from None
    with target.open("wb") as f:
        n_files = write_export(detail, events, s.data_dir, f)
    err.print(Text(f"wrote {target} ({len(events)} events, {len(detail.casts)} casts, {n_files} artifacts)"))


def stats(s: Settings, top: int, since: str | None, sensor: str | None = None) -> None:
    """`sandtrap stats` (a command of the top level, registered in :mod:`sandtrap.cli`)."""
    when = parse_since(since)
    why = _nothing_recorded(s)
    if why:
        out.print(Text(f"0 sessions: {why}"), soft_wrap=True)
        return
    try:
        with Repository(s.database_url) as repo:
            st = repo.stats(top, since=when, sensor=sensor)
    except SandtrapError as exc:
        raise _fail(str(exc)) from None
    out.print(
        Text(
            f"{st.sessions} sessions, {st.auth_attempts} login attempts, {st.commands} commands, {st.artifacts} artifacts"
        )
    )
    tables: list[tuple[str, list[Any]]] = [
        ("usernames", st.top_usernames),
        ("passwords", st.top_passwords),
        ("source IPs", st.top_src_ips),
        ("services", st.sessions_per_service),
        ("commands", st.top_commands),
        ("client versions", st.top_client_versions),
    ]
    for title, rows in tables:
        t = Table(title=f"top {title}")
        t.add_column("value")
        t.add_column("count", justify="right")
        for r in rows:
            t.add_row(visible(r.value, 100), str(r.count))
        out.print(t)
    pairs = Table(title="top username/password pairs")
    for col in ("username", "password", "count"):
        pairs.add_column(col)
    for p in st.top_pairs:
        pairs.add_row(visible(p.username, 40), visible(p.password, 60), str(p.count))
    out.print(pairs)
