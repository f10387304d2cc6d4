"""The session page's view of a :class:`SessionDetail`: recordings, where each command sits in one, files.

A session has one cast per channel (``casts/<session>/<channel>.cast``). A command is placed in the
cast of its channel, at ``command time − cast opened``: clicking it seeks that recording there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

from sandtrap.api.files import pcap_path
from sandtrap.storage.records import ArtifactInfo, CastInfo, CommandInfo, SessionDetail

_SHA256 = re.compile(r"[0-9a-f]{64}")
CHANGED = "changed"


@dataclass(frozen=True)
class Recording:
    index: int
    channel: int | None
    url: str
    cast: CastInfo

    @property
    def label(self) -> str:
        return "recording" if self.channel is None else f"channel {self.channel}"


@dataclass(frozen=True)
class PlacedCommand:
    command: CommandInfo
    recording: int | None  # index into the recordings; None when no cast holds it
    offset_s: float | None


def session_path(session_id: str) -> str:
    return "/sessions/" + quote(session_id, safe="")


def api_session_path(session_id: str) -> str:
    return "/api/v1/sessions/" + quote(session_id, safe="")


def cast_url(session_id: str, cast: CastInfo, first: bool) -> str:
    """The API's cast download; ``?channel=`` picks a channel's cast when the session has several."""
    url = api_session_path(session_id) + "/cast"
    return url if first or cast.channel is None else f"{url}?channel={cast.channel}"


def artifact_url(sha256: str | None) -> str | None:
    """The API's download link for stored content; None for a hash that is not one of ours."""
    return f"/api/v1/artifacts/{sha256}" if sha256 and _SHA256.fullmatch(sha256) else None


def recordings(detail: SessionDetail) -> list[Recording]:
    casts = [c for c in detail.casts if c.path]
    return [Recording(i, c.channel, cast_url(detail.id, c, i == 0), c) for i, c in enumerate(casts)]


def place_commands(detail: SessionDetail, recs: list[Recording]) -> list[PlacedCommand]:
    by_channel = {r.channel: r for r in recs}
    placed: list[PlacedCommand] = []
    for cmd in detail.commands:
        rec = by_channel.get(cmd.channel) if cmd.channel is not None else (recs[0] if recs else None)
        if rec is None and len(recs) == 1 and recs[0].channel is None:
            rec = recs[0]
        if rec is None:
            placed.append(PlacedCommand(cmd, None, None))
            continue
        origin = rec.cast.opened_at or detail.started_at
        placed.append(PlacedCommand(cmd, rec.index, offset(cmd.timestamp, origin)))
    return placed


def offset(moment: datetime, origin: datetime) -> float:
    """Seconds from ``origin`` to ``moment``, never negative (an exec command comes just before its cast)."""
    return round(max(0.0, (moment - origin).total_seconds()), 3)


def pcap_bytes(data_dir: Path, session_id: str) -> int | None:
    """The size of the session's network capture (network.mode: capture), None when it has none."""
    path = pcap_path(data_dir, session_id)
    try:
        return path.stat().st_size if path is not None else None
    except OSError:
        return None


def split_artifacts(artifacts: list[ArtifactInfo]) -> tuple[list[ArtifactInfo], list[ArtifactInfo]]:
    """Downloads and uploads first; files the session changed in the box second."""
    return [a for a in artifacts if a.via != CHANGED], [a for a in artifacts if a.via == CHANGED]


def split_changed(changed: list[ArtifactInfo]) -> tuple[list[ArtifactInfo], list[ArtifactInfo]]:
    """The attacker's changes (and rows from before origins were recorded); the login's bookkeeping and the
    box's daemons' churn apart."""
    mine = [a for a in changed if a.origin in (None, "attacker")]
    return mine, [a for a in changed if a.origin not in (None, "attacker")]


def player_data(
    detail: SessionDetail, recs: list[Recording], placed: list[PlacedCommand], live: dict[str, Any] | None
) -> dict[str, Any]:
    """What session.js needs, handed over as a JSON block (see :func:`escaping.json_script`)."""
    return {
        "session": detail.id,
        "recordings": [
            {
                "index": r.index,
                "url": r.url,
                "label": r.label,
                "channel": r.channel,
                "closed": r.cast.closed_at is not None,
            }
            for r in recs
        ],
        "commands": [{"recording": p.recording, "offset": p.offset_s} for p in placed],
        "live": live,
    }


def format_offset(seconds: float | None) -> str:
    if seconds is None:
        return ""
    minutes, secs = divmod(seconds, 60)
    hours, minutes = divmod(int(minutes), 60)
    return f"{hours}:{minutes:02d}:{secs:04.1f}" if hours else f"{minutes}:{secs:04.1f}"
