"""Composition root: Settings in, running services out. Only this module imports everything."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from fastapi import FastAPI

from sandtrap.api.app import create_app
from sandtrap.api.deps import ApiDeps
from sandtrap.api.server import ApiServer, check_exposure
from sandtrap.bridge.artifacts import ArtifactStore
from sandtrap.bridge.connection import Hub
from sandtrap.bridge.sessions import Prepared, SessionManager
from sandtrap.config import Settings
from sandtrap.errors import ConfigError
from sandtrap.events import SESSION_CRASHED, Emitter, EventBus, EventSink, sensor_uuid
from sandtrap.outputs.database import DatabaseSink
from sandtrap.outputs.jsonlog import JsonLogSink
from sandtrap.outputs.metrics import MetricsSink
from sandtrap.outputs.recording import RecordingHealth
from sandtrap.sandbox.base import SandboxBackend
from sandtrap.sandbox.docker import seccomp
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.microvm.backend import MicroVMBackend
from sandtrap.sandbox.pool import Pool, Progress
from sandtrap.ssh.auth import AuthPolicy
from sandtrap.ssh.hostkeys import box_host_key_files, host_key_dir, load_host_keys
from sandtrap.ssh.server import ServerContext, SSHFrontEnd
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository

log = logging.getLogger(__name__)


def _planted_files(settings: Settings) -> dict[str, tuple[bytes, int, float]] | None:
    """What every box gets before it boots, whatever its backend: the sensor's host keys (share_host_keys)."""
    if not settings.sandbox.share_host_keys:
        return None
    keys = host_key_dir(settings.ssh.host_key_dir, settings.data_dir)
    load_host_keys(keys)  # generated now if missing: the SSH front end loads the same files
    return box_host_key_files(keys, settings.sandbox.hostname)


def _docker(settings: Settings) -> SandboxBackend:
    docker = settings.sandbox.docker
    profile = seccomp.resolve(docker.seccomp_profile, settings.data_dir)
    return DockerBackend(docker, settings.sandbox, settings.sensor, profile, _planted_files(settings))


def cache_dir(settings: Settings) -> Path:
    """``image.cache_dir``, or ``<data_dir>/cache``: the debootstrap tarball and the VM images."""
    return Path(settings.image.cache_dir) if settings.image.cache_dir else settings.data_dir / "cache"


def _microvm(settings: Settings) -> SandboxBackend:
    sandbox = settings.sandbox
    return MicroVMBackend(
        sandbox.microvm, sandbox, settings.image, cache_dir(settings), settings.data_dir / "microvm",
        _planted_files(settings),
    )  # fmt: skip


# sandbox.backend -> how to build it from the settings; config.SandboxSettings refuses a name not here.
BACKENDS: dict[str, Callable[[Settings], SandboxBackend]] = {"docker": _docker, "microvm": _microvm}


def build_backend(settings: Settings) -> SandboxBackend:
    build = BACKENDS.get(settings.sandbox.backend)
    if build is None:  # config.AVAILABLE_BACKENDS and BACKENDS name the same backends (a unit test checks)
        raise ConfigError(f"sandbox.backend: {settings.sandbox.backend} is not available; set sandbox.backend: docker")
    return build(settings)


@dataclass
class Services:
    settings: Settings
    backend: SandboxBackend
    pool: Pool[Prepared]
    bus: EventBus
    manager: SessionManager
    ssh: SSHFrontEnd
    database: DatabaseSink
    repository: Repository
    jsonlog: JsonLogSink | None
    ctx: ServerContext
    # -- API (REST, live view, /metrics) -------------------------------------------------------------
    metrics: MetricsSink | None = None
    api_app: FastAPI | None = None
    api: ApiServer | None = None


@contextlib.asynccontextmanager
async def running(
    settings: Settings, progress: Progress | None = None, sinks: list[EventSink] | None = None
) -> AsyncIterator[Services]:
    """Start every service; stop them all (gracefully) on exit."""
    check_exposure(settings)  # ConfigError: a non-loopback api.listen needs api.token
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    backend = build_backend(settings)
    pool: Pool[Prepared] = Pool(backend, settings.sandbox, settings.data_dir / "sandboxes")
    bus = EventBus()
    for sink in sinks or []:
        bus.add_sink(sink)
    manager = SessionManager(pool, settings.sandbox, settings.limits, settings.sandbox.honeytokens)
    # Done while a box waits warm, not while the attacker does: honeytokens planted, accounts read.
    pool.prepare = manager.prepare
    # Every output that writes to the data dir reports its failures here (the database sink: its status).
    recording = RecordingHealth(settings.data_dir)
    jsonlog = None
    if settings.recording.jsonlog:
        jsonlog = JsonLogSink(
            settings.data_dir / "log",
            settings.recording.jsonlog_rotate_bytes,
            settings.recording.jsonlog_rotate_daily,
            health=recording,
        )
        bus.add_sink(jsonlog)
    artifacts = ArtifactStore(
        settings.data_dir / "artifacts", settings.recording.artifact_max_total_bytes, health=recording
    )
    url = settings.database_url
    uuid = sensor_uuid(settings.data_dir / "sensor.uuid")
    await asyncio.to_thread(upgrade, url)  # StorageError names storage.database_url
    database = DatabaseSink(url, settings.storage.buffer_events, jsonlog=jsonlog.path if jsonlog else None)
    repository = Repository(url)
    recording.database_status = database.status
    # Events written while the database was unreachable reach it now; then close what a crash left open.
    await asyncio.to_thread(database.catch_up_from_jsonlog)
    bus.add_sink(database)
    metrics = MetricsSink(pool.stats, database.status, recording.status)
    bus.add_sink(metrics)
    now = datetime.now(UTC)
    for sid in await asyncio.to_thread(repository.close_crashed_sessions, now, settings.sensor):
        log.warning("session %s was left open by a previous run: closed as crash", sid)
        Emitter(bus, settings.sensor, sid, "", 0, "", 0, uuid).emit(SESSION_CRASHED, reason="crash")
    hub = Hub(
        manager,
        bus,
        artifacts,
        settings.limits,
        settings.recording,
        settings.data_dir,
        settings.sensor,
        sensor_uuid=uuid,
        health=recording,
    )
    ctx = ServerContext(hub, settings.ssh, settings.auth, AuthPolicy(settings.auth))
    ssh = SSHFrontEnd(ctx, settings.data_dir)
    api_deps = ApiDeps(
        settings,
        repository,
        live=hub.live,
        pool_stats=pool.stats,
        engine_ping=backend.ping,
        storage_status=database.status,
        recording_status=recording.status,
        metrics=metrics.registry,
    )
    api_app = create_app(api_deps)
    api = ApiServer(api_app, settings.api.listen)
    try:
        await backend.ping()
        await pool.start(progress)
        await ssh.start()
        await api.start()
        yield Services(
            settings, backend, pool, bus, manager, ssh, database, repository, jsonlog, ctx, metrics, api_app, api
        )
    finally:
        log.info("shutting down: closing listeners, stopping sandboxes")
        await asyncio.shield(api.close())
        await asyncio.shield(ssh.close())
        await asyncio.shield(hub.drain())
        await asyncio.shield(manager.close())
        await asyncio.shield(pool.close())
        await backend.close()
        await asyncio.to_thread(database.close, 10.0)
        repository.close()
        if jsonlog is not None:
            await asyncio.to_thread(jsonlog.close)


async def serve(settings: Settings, progress: Progress | None = None) -> None:
    """Run until SIGINT/SIGTERM."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with running(settings, progress) as services:
        log.info("sandtrap running: sensor=%s pool=%s", settings.sensor, services.pool.stats())
        await stop.wait()
