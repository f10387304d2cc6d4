"""What attackers leave behind: uploads and changed files, stored content-addressed by sha256.

Files land in ``<data_dir>/artifacts/<sha[:2]>/<sha256>``, mode 0440 (never executable), written
atomically. Caps: per file, per session and in total; a file over a cap is recorded as metadata
only (``stored: false``). Artifacts are never opened, parsed or executed here.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import os
import posixpath
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sandtrap.bridge.origin import SHADOW, LoginFacts, classify, is_login_record
from sandtrap.config import RecordingSettings
from sandtrap.errors import SandboxError
from sandtrap.outputs.recording import ARTIFACTS, RecordingHealth
from sandtrap.sandbox.base import FileData, Sandbox, Snapshot

log = logging.getLogger(__name__)

Report = Callable[..., Any]


@dataclass(frozen=True, slots=True)
class Stored:
    sha256: str
    outfile: str  # relative to the data dir
    stored: bool
    duplicate: bool


class ArtifactStore:
    """Content-addressed files under one directory, with a total size cap."""

    def __init__(self, directory: Path, max_total_bytes: int, health: RecordingHealth | None = None) -> None:
        self.directory = directory
        self._health = health
        self._max_total = max_total_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self.total_bytes = sum(p.stat().st_size for p in directory.glob("*/*") if p.is_file())
        self.stored_count = 0
        self.errors = 0

    def path_for(self, sha256: str) -> Path:
        return self.directory / sha256[:2] / sha256

    def put(self, data: bytes, allow: bool = True) -> Stored:
        sha = hashlib.sha256(data).hexdigest()
        target = self.path_for(sha)
        rel = str(Path("artifacts") / sha[:2] / sha)
        if target.exists():
            return Stored(sha, rel, True, True)
        if not allow or self.total_bytes + len(data) > self._max_total:
            return Stored(sha, "", False, False)
        # A name of its own per write: two sessions storing the same content at once must not share it.
        tmp = target.with_suffix(f".{secrets.token_hex(6)}.part")
        try:
            target.parent.mkdir(exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o440)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, target)
        except OSError as exc:
            self.errors += 1
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)  # no half-written .part left to fill the disk further
            if self._health is not None:
                self._health.failed(ARTIFACTS, exc)
            else:
                log.error("storing artifact %s failed: %s", sha, exc)
            return Stored(sha, "", False, False)
        if self._health is not None:
            self._health.succeeded(ARTIFACTS)
        self.total_bytes += len(data)
        self.stored_count += 1
        return Stored(sha, rel, True, False)


_SHADOW_MAX = 1 << 20


@dataclass(frozen=True, slots=True)
class Baseline:
    """A box's state when a session began: what its changed files are diffed against (None: the backend could
    not take one; the diff is then against the box as made), and ``/etc/shadow`` to tell the login's line."""

    snapshot: Snapshot | None
    shadow: bytes | None


async def _shadow(sandbox: Sandbox) -> bytes | None:
    try:
        info = await sandbox.get_file(SHADOW, _SHADOW_MAX)
    except SandboxError:
        return None
    return info.data if info is not None else None


async def take_baseline(sandbox: Sandbox) -> Baseline:
    """The box now, before the session's attacker acts (after the honeypot's own setup and planting)."""
    started = time.monotonic()
    try:
        snapshot: Snapshot | None = await sandbox.snapshot()
    except SandboxError as exc:
        log.warning("no baseline of %s's files (its changes will be against the box as made): %s", sandbox.name, exc)
        snapshot = None
    baseline = Baseline(snapshot, await _shadow(sandbox))
    log.debug("baseline of %s: %d paths in %.0f ms", sandbox.name, len(snapshot.files) if snapshot else 0,
              (time.monotonic() - started) * 1000)  # fmt: skip
    return baseline


@dataclass
class SessionArtifacts:
    """Per connection: the uploads seen so far and the bytes stored for this session."""

    store: ArtifactStore
    settings: RecordingSettings
    stored_bytes: int = 0
    uploads: list[tuple[str, str]] = field(default_factory=list)  # (path in the box, via)
    seen: set[str] = field(default_factory=set)

    def note_upload(self, path: str, via: str, cwd: str) -> None:
        full = posixpath.normpath(posixpath.join(cwd, path))
        if len(self.uploads) < 10_000:
            self.uploads.append((full, via))

    async def fetch(self, sandbox: Sandbox, path: str, content: bool = True) -> tuple[FileData | None, Stored | None]:
        """Read ``path`` from the box and store it if the caps allow (metadata only if not ``content``)."""
        try:
            info = await sandbox.get_file(path, self.settings.artifact_max_file_bytes if content else -1)
        except SandboxError as exc:
            log.info("artifact %s not readable: %s", path, exc)
            return None, None
        if info is None or info.data is None:
            return info, None
        allow = self.stored_bytes + len(info.data) <= self.settings.artifact_max_session_bytes
        stored = await asyncio.to_thread(self.store.put, info.data, allow)
        if stored.stored and not stored.duplicate:
            self.stored_bytes += len(info.data)
        return info, stored

    async def keep(self, data: bytes) -> tuple[str, str, bool, bool]:
        """Store bytes the session fetched through the network (a download) under the session's cap:
        (sha256, outfile, stored, duplicate)."""
        allow = len(data) <= self.settings.artifact_max_file_bytes and (
            self.stored_bytes + len(data) <= self.settings.artifact_max_session_bytes
        )
        stored = await asyncio.to_thread(self.store.put, data, allow)
        if stored.stored and not stored.duplicate:
            self.stored_bytes += len(data)
        return stored.sha256, stored.outfile, stored.stored, stored.duplicate

    async def collect_uploads(self, sandbox: Sandbox, report: Report) -> None:
        """Store every file uploaded so far (called when a transfer channel closes)."""
        pending, self.uploads = self.uploads, []
        for path, via in pending:
            info, stored = await self.fetch(sandbox, path)
            if info is None or not info.is_regular:
                continue
            self.seen.add(path)
            report(
                filename=posixpath.basename(path),  # Cowrie: the base name; the full path is destfile
                destfile=path,
                outfile=stored.outfile if stored else "",
                shasum=stored.sha256 if stored else "",
                size=info.size,
                via=via,
                stored=bool(stored and stored.stored),
                duplicate=bool(stored and stored.duplicate),
            )

    async def collect_changes(
        self, sandbox: Sandbox, report: Report, baseline: Baseline | None = None, facts: LoginFacts | None = None
    ) -> None:
        """At session end: every file the session added or changed since ``baseline`` (and deletions, as
        metadata), each with its origin (:mod:`sandtrap.bridge.origin`); contents kept but for the login's records."""
        since = baseline.snapshot if baseline is not None else None
        try:
            changes = await sandbox.changed_files(since=since)
        except SandboxError as exc:
            log.warning("changed files not available: %s", exc)
            return
        facts = facts or LoginFacts()
        if any(c.path == SHADOW for c in changes):
            before = baseline.shadow if baseline is not None else None
            facts = dataclasses.replace(facts, shadow_before=before, shadow_after=await _shadow(sandbox))
        for change in changes[:5000]:
            if change.path.startswith(("/proc/", "/sys/", "/dev/")):
                continue
            origin = classify(change.path, change.kind, facts)
            if change.kind == "D":
                report(
                    filename=change.path, kind="D", origin=origin, shasum="", size=0, mode=0, outfile="", stored=False
                )
                continue
            content = not is_login_record(change.path) and change.path not in self.settings.changed_metadata_only
            info, stored = await self.fetch(sandbox, change.path, content)
            if info is None or not info.is_regular:
                continue
            report(
                filename=change.path,
                kind=change.kind,
                origin=origin,
                shasum=stored.sha256 if stored else "",
                size=info.size,
                mode=f"{info.mode:04o}",
                outfile=stored.outfile if stored else "",
                stored=bool(stored and stored.stored),
            )
