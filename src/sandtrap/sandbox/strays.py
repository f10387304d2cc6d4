"""Boxes the pool does not hold: what a previous run left (adopted at start-up), running boxes nobody tracks
(stopped by the sweep), and a stop that failed (retried with backoff). Each kept box is ``preserved`` in the
ledger, under retention."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Set
from datetime import UTC, datetime

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import Sandbox, SandboxBackend, SandboxInfo
from sandtrap.sandbox.ledger import Ledger, when

log = logging.getLogger(__name__)


async def quietly(aw: Awaitable[None]) -> None:
    try:
        await aw
    except SandboxError as exc:
        log.warning("%s", exc)


async def adopt_leftovers(backend: SandboxBackend, ledger: Ledger) -> list[SandboxInfo]:
    """Stale warm boxes are removed; session boxes left running are stopped. Returns the kept (preserved) ones."""
    kept = []
    for info in await backend.list_managed():
        sandbox = backend.sandbox(info.id, info.name)
        record = ledger.read(info.id)
        if info.state == "warm" and not record.get("session"):
            log.info("reconcile: removing stale warm sandbox %s", info.name)
            await quietly(sandbox.remove())
            ledger.delete(info.id)
            continue
        if info.state in ("active", "warm"):
            log.info("reconcile: stopping sandbox %s left running by a previous run", info.name)
            await quietly(sandbox.stop())
        info.state = "preserved"
        info.session = record.get("session") or info.session
        info.src_ip = record.get("src_ip") or info.src_ip
        info.acquired = when(record.get("acquired"))
        info.released = when(record.get("released")) or info.released or datetime.now(UTC)
        ledger.write(info)
        kept.append(info)
    return kept


async def stop_untracked(
    backend: SandboxBackend, ledger: Ledger, tracked: Set[str], young: datetime
) -> list[SandboxInfo]:
    """Stop running boxes not in ``tracked`` and created before ``young``; returns those stopped (preserved)."""
    stopped = []
    for info in await backend.list_managed():
        if info.state == "preserved" or info.id in tracked or info.created > young:
            continue
        log.warning("sweep: stopping untracked running sandbox %s (session %s)", info.name, info.session or "-")
        try:
            await backend.sandbox(info.id, info.name).stop()
        except SandboxError as exc:
            log.warning("sweep: stopping %s failed: %s", info.name, exc)
            continue
        record = ledger.read(info.id)
        info.state = "preserved"
        info.session = record.get("session") or info.session
        info.released = datetime.now(UTC)
        ledger.write(info)
        stopped.append(info)
    return stopped


async def stop_eventually(sandbox: Sandbox, attempts: int = 12) -> None:
    """Stop a box whose stop failed (an overloaded or restarting engine), with backoff."""
    for attempt in range(1, attempts + 1):
        await asyncio.sleep(min(30.0, 2.0**attempt))
        try:
            await sandbox.stop()
        except SandboxError as exc:
            if attempt == attempts:
                log.error("sandbox %s still running after %d stop attempts: %s", sandbox.name, attempts, exc)
            continue
        log.info("sandbox %s stopped (attempt %d)", sandbox.name, attempt + 1)
        return
