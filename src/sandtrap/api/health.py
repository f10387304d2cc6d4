"""``/healthz`` (liveness, no token), ``/api/v1/status`` (pool, engine, storage, recording, alerts) and ``/metrics``."""

# No ``from __future__ import annotations`` here: FastAPI reads these signatures at run time.

import asyncio
import time
from datetime import UTC, datetime

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, choose_encoder

from sandtrap import __version__
from sandtrap.api.deps import ApiDeps
from sandtrap.api.models import (
    AlertsStatus,
    Health,
    Healthz,
    PoolStatus,
    Problem,
    RecordingStatus,
    Status,
    StorageStatus,
)
from sandtrap.storage.engine import StorageError

ENGINE_TIMEOUT_S = 5.0
STORAGE_TIMEOUT_S = 10.0


def health_router(deps: ApiDeps) -> APIRouter:
    router = APIRouter(generate_unique_id_function=lambda route: route.name)

    @router.get("/healthz", tags=["status"])
    async def healthz() -> Healthz:
        """Liveness: the process serves requests. Needs no token."""
        return Healthz()

    @router.get("/api/v1/status", tags=["status"])
    async def status() -> Status:
        """Pool (warm/active/preserved), engine, storage and recording health, uptime and version."""
        pool = None
        if deps.pool_stats is not None:
            s = deps.pool_stats()
            pool = PoolStatus(
                warm=s.get("warm", 0),
                active=s.get("active", 0),
                preserved=s.get("preserved", 0),
                creating=s.get("creating", 0),
                start_failures=s.get("start_failures", 0),
                stop_retries=s.get("stop_retries", 0),
                strays_stopped=s.get("strays_stopped", 0),
            )
        engine = await _engine(deps) if deps.engine_ping is not None else None
        recording = None
        if deps.recording_status is not None:
            recording = RecordingStatus(**await asyncio.to_thread(deps.recording_status))
        return Status(
            version=__version__,
            sensor=deps.settings.sensor,
            mode="honeypot" if deps.pool_stats is not None else "console",
            uptime_s=round(time.monotonic() - deps.started_monotonic, 3),
            pool=pool,
            engine=engine,
            storage=await _storage(deps),
            recording=recording,
            alerts=AlertsStatus(**deps.alerts_status()) if deps.alerts_status is not None else None,
        )

    @router.get(
        "/metrics",
        tags=["status"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text format (OpenMetrics when the Accept header asks for it)",
                "content": {CONTENT_TYPE_PLAIN_0_0_4: {}},
            },
            404: {"model": Problem, "description": "no metrics here: `sandtrap api` serves none"},
        },
    )
    async def metrics(request: Request) -> Response:
        """Prometheus metrics of this honeypot (sessions, auth attempts, pool, storage, ...)."""
        if deps.metrics is None:
            raise HTTPException(404, "no metrics here: they are served by `sandtrap run`")
        encode, content_type = choose_encoder(request.headers.get("accept", ""))
        return Response(encode(deps.metrics), headers={"Content-Type": content_type})

    return router


async def _engine(deps: ApiDeps) -> Health:
    assert deps.engine_ping is not None
    try:
        async with asyncio.timeout(ENGINE_TIMEOUT_S):
            await deps.engine_ping()
    except TimeoutError:
        return Health(ok=False, error=f"no answer within {ENGINE_TIMEOUT_S:g}s")
    except Exception as exc:
        return Health(ok=False, error=str(exc)[:300] or type(exc).__name__)
    return Health(ok=True)


async def _storage(deps: ApiDeps) -> StorageStatus:
    sink = deps.storage_status() if deps.storage_status is not None else {}
    counters = {
        k: sink[k]
        for k in (
            "pending",
            "stored",
            "rejected",
            "errors",
            "dropped",
            "is_down",
            "down_since",
            "spilling",
            "spilled",
            "replayed",
            "backlog",
            "catch_ups",
        )
        if k in sink
    }
    try:
        async with asyncio.timeout(STORAGE_TIMEOUT_S):
            await asyncio.to_thread(deps.repository.count_sessions, since=datetime.now(UTC))
    except TimeoutError:
        return StorageStatus(ok=False, error=f"no answer within {STORAGE_TIMEOUT_S:g}s", **counters)
    except StorageError as exc:
        return StorageStatus(ok=False, error=str(exc)[:300], **counters)
    return StorageStatus(ok=True, **counters)
