"""Files the API hands out: casts, artifacts and session exports, only ever from under the data dir.

A path is never taken from a request. It is computed from a validated id (an artifact's sha256) or read
from the database (a cast's path), resolved, and served only when the data dir is one of its parents and
it is a regular file. Downloads are attachments with ``nosniff``: a browser never renders attacker files.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import tarfile
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import IO

from fastapi.responses import StreamingResponse

from sandtrap.storage.records import CastInfo, SessionDetail, StoredEvent

SESSION_ID = re.compile(r"[0-9a-f]{12}")
SHA256 = re.compile(r"[0-9a-f]{64}")
CHUNK_BYTES = 256 * 1024
SPOOL_BYTES = 16 * 1024 * 1024
# Downloads: should a browser show one anyway, it runs nothing and loads nothing.
DOWNLOAD_CSP = "default-src 'none'; frame-ancestors 'none'; sandbox"


def under(data_dir: Path, relative: str | Path) -> Path | None:
    """``data_dir / relative`` resolved, if it is a regular file inside ``data_dir``; else None."""
    root = data_dir.resolve()
    try:
        path = (root / relative).resolve()
    except (OSError, RuntimeError, ValueError):
        return None
    if root not in path.parents:
        return None
    try:
        return path if path.is_file() else None
    except (OSError, ValueError):
        return None


def artifact_path(data_dir: Path, sha256: str) -> Path | None:
    """The stored artifact (the layout of :class:`sandtrap.bridge.artifacts.ArtifactStore`), if present."""
    if not SHA256.fullmatch(sha256):
        return None
    return under(data_dir, Path("artifacts") / sha256[:2] / sha256)


def pcap_path(data_dir: Path, session_id: str) -> Path | None:
    """The session's network capture (``<data_dir>/pcap/<session>.pcap``, network.mode: capture), if there."""
    return under(data_dir, Path("pcap") / f"{session_id}.pcap")


def cast_paths(data_dir: Path, casts: list[CastInfo], channel: int | None = None) -> list[tuple[CastInfo, Path]]:
    """The recordings that are on disk, optionally only ``channel``'s."""
    found = []
    for cast in casts:
        if channel is not None and cast.channel != channel:
            continue
        path = under(data_dir, cast.path) if cast.path else None
        if path is not None:
            found.append((cast, path))
    return found


def attachment(filename: str) -> str:
    """A Content-Disposition for a name we made (ids and digits only, so no quoting is needed)."""
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,200}", filename):
        filename = "download.bin"
    return f'attachment; filename="{filename}"'


def download(path: Path, media_type: str, filename: str) -> StreamingResponse:
    """``path`` as an attachment; the bytes it had when asked for (a cast still being written may grow)."""
    size = path.stat().st_size

    async def body() -> AsyncIterator[bytes]:
        f = await asyncio.to_thread(path.open, "rb")
        try:
            left = size
            while left > 0:
                chunk = await asyncio.to_thread(f.read, min(CHUNK_BYTES, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    headers = {
        "Content-Length": str(size),
        "Content-Disposition": attachment(filename),
        "Content-Security-Policy": DOWNLOAD_CSP,
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(body(), media_type=media_type, headers=headers)


def write_export(detail: SessionDetail, events: list[StoredEvent], data_dir: Path, out: IO[bytes]) -> int:
    """The session as a tar.gz (``sandtrap sessions export``'s layout); returns how many artifacts it holds.

    ``session-<id>/metadata.json``, ``events.jsonl``, ``casts/*`` and ``artifacts/<sha256>`` (mode 0440).
    """
    top = f"session-{detail.id}"
    n_files = 0
    with tarfile.open(fileobj=out, mode="w:gz") as tar:

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            info = tarfile.TarInfo(f"{top}/{name}")
            info.size, info.mode, info.mtime = len(data), mode, int(time.time())
            tar.addfile(info, io.BytesIO(data))

        add("metadata.json", detail.model_dump_json(indent=2).encode())
        add("events.jsonl", b"".join(json.dumps(e.data, ensure_ascii=False).encode() + b"\n" for e in events))
        for _, path in cast_paths(data_dir, detail.casts):
            add(f"casts/{path.name}", path.read_bytes())
            raw = under(data_dir, path.with_name(path.name + ".input.raw"))
            if raw is not None:
                add(f"casts/{raw.name}", raw.read_bytes())
        seen: set[str] = set()
        for a in detail.artifacts:
            if not (a.stored and a.sha256) or a.sha256 in seen:
                continue
            stored = artifact_path(data_dir, a.sha256)
            if stored is not None:
                add(f"artifacts/{a.sha256}", stored.read_bytes(), 0o440)
                seen.add(a.sha256)
                n_files += 1
    return n_files


def export_download(detail: SessionDetail, events: list[StoredEvent], data_dir: Path) -> StreamingResponse:
    """The export, built when the download starts (in a spooled temporary file) and streamed."""

    async def body() -> AsyncIterator[bytes]:
        with tempfile.SpooledTemporaryFile(SPOOL_BYTES) as f:
            await asyncio.to_thread(write_export, detail, events, data_dir, f)
            f.seek(0)
            read: Callable[[int], bytes] = f.read
            while chunk := await asyncio.to_thread(read, CHUNK_BYTES):
                yield chunk

    headers = {
        "Content-Disposition": attachment(f"session-{detail.id}.tar.gz"),
        "Content-Security-Policy": DOWNLOAD_CSP,
        "X-Content-Type-Options": "nosniff",
    }
    return StreamingResponse(body(), media_type="application/gzip", headers=headers)
