"""Composition root: Settings in, running services out. Only this module imports everything."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from fastapi import FastAPI

from sandtrap.api.app import create_app
from sandtrap.api.deps import ApiDeps
from sandtrap.api.server import ApiServer, check_exposure
from sandtrap.bridge.artifacts import ArtifactStore
from sandtrap.bridge.auth import AuthPolicy
from sandtrap.bridge.connection import Hub, ServiceBounds
from sandtrap.bridge.sessions import Prepared, SessionManager
from sandtrap.bridge.stream import RawService
from sandtrap.config import PersonaSettings, ServiceSettings, Settings
from sandtrap.errors import ConfigError
from sandtrap.events import SESSION_CRASHED, Emitter, EventBus, EventSink, sensor_uuid
from sandtrap.memtrim import MemoryTrim
from sandtrap.network.gateway import Gateway
from sandtrap.network.tls import SensorCA
from sandtrap.network.vmtap import VMNet
from sandtrap.outputs.alerts import AlertSink
from sandtrap.outputs.database import DatabaseSink
from sandtrap.outputs.jsonlog import JsonLogSink
from sandtrap.outputs.metrics import MetricsSink
from sandtrap.outputs.recording import RecordingHealth
from sandtrap.raw.tcp import TCPFrontEnd
from sandtrap.raw.udp import UDPFrontEnd
from sandtrap.sandbox.base import SandboxBackend
from sandtrap.sandbox.docker import engine, seccomp
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.microvm.backend import MicroVMBackend
from sandtrap.sandbox.microvm.qemu import TAP, GuestNet
from sandtrap.sandbox.nspawn.backend import NspawnBackend
from sandtrap.sandbox.personas import Persona
from sandtrap.sandbox.pool import Pool, Progress
from sandtrap.ssh.hostkeys import box_host_key_files, host_key_dir, load_host_keys
from sandtrap.ssh.server import ServerContext, SSHFrontEnd
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository
from sandtrap.telnet.server import TelnetContext, TelnetFrontEnd

log = logging.getLogger(__name__)


def _planted_files(settings: Settings, hostname: str = "") -> dict[str, tuple[bytes, int, float]] | None:
    """What every box gets before it boots, whatever its backend: the sensor's host keys (share_host_keys),
    commented with the box's hostname (``hostname``; '' = sandbox.hostname)."""
    if not settings.sandbox.share_host_keys:
        return None
    keys = host_key_dir(settings.ssh.host_key_dir, settings.data_dir)
    load_host_keys(keys)  # generated now if missing: the SSH front end loads the same files
    return box_host_key_files(keys, hostname or settings.sandbox.hostname)


def vm_planted_files(settings: Settings) -> dict[str, tuple[bytes, int, float]]:
    """What a VM image bakes in (``sandtrap image build`` and the backend agree): the planted files, and with
    network.mode: capture and tls_intercept the gateway's per-sensor CA (the same files a Docker box gets)."""
    files = dict(_planted_files(settings) or {})
    network = settings.network
    if network.mode == "capture" and network.tls_intercept:
        files.update(SensorCA(settings.data_dir / "network").box_files())
    return files


def _docker(settings: Settings, gateway: Gateway | None = None) -> SandboxBackend:
    docker = settings.sandbox.docker
    profile = seccomp.resolve(docker.seccomp_profile, settings.data_dir)
    attach = gateway.attach if gateway is not None else None
    ca = gateway.ca.box_files() if gateway is not None and gateway.ca is not None else {}  # trusted as a local CA
    files = {**(_planted_files(settings) or {}), **ca}
    own = {  # a persona with a hostname of its own: its host keys commented with it
        p.name: {**(_planted_files(settings, p.hostname) or {}), **ca}
        for p in settings.effective_personas()
        if p.hostname and p.hostname != settings.sandbox.hostname
    }
    netns = gateway.ns.path if gateway is not None else ""
    return DockerBackend(docker, settings.sandbox, settings.sensor, profile, files or None, attach, netns, own)


def box_persona(settings: Settings, persona: PersonaSettings) -> Persona:
    """What a persona's boxes are made as: its hostname, domain and image over the sandbox section's."""
    box = settings.sandbox
    domain = box.domain if persona.domain is None else persona.domain
    image = persona.image_tag(box.docker.image)
    return Persona(persona.name, persona.hostname or box.hostname, domain, image)


def cache_dir(settings: Settings) -> Path:
    """``image.cache_dir``, or ``<data_dir>/cache``: the debootstrap tarball and the VM images."""
    return Path(settings.image.cache_dir) if settings.image.cache_dir else settings.data_dir / "cache"


def _microvm(settings: Settings, gateway: Gateway | None = None) -> SandboxBackend:
    # The VM's tap is in a namespace of its own (sandbox/microvm/qemu.py); with network.mode: capture the gateway
    # serves it there once QEMU starts (network/vmtap.py). none: the tap only, nothing answering on it.
    sandbox = settings.sandbox
    on_start = None
    if gateway is not None:
        guest = GuestNet.from_subnet(sandbox.network_subnet)
        net = VMNet(TAP, guest.address, sandbox.network_subnet)

        async def on_start(vm_id: str, pid: int) -> None:
            await gateway.attach_vm(vm_id, pid, net)

    return MicroVMBackend(
        sandbox.microvm, sandbox, settings.image, cache_dir(settings), settings.data_dir / "microvm",
        vm_planted_files(settings), on_start,
    )  # fmt: skip


def _nspawn(settings: Settings, gateway: Gateway | None = None) -> SandboxBackend:
    # network.mode capture: each box's eth0 on the capture gateway, as Docker's (the same Gateway.attach)
    sandbox = settings.sandbox
    files = dict(_planted_files(settings) or {})
    if gateway is not None and gateway.ca is not None:  # the capture gateway's CA, trusted as a local CA
        files.update(gateway.ca.box_files())
    attach = gateway.attach if gateway is not None else None
    netns = gateway.ns.path if gateway is not None else ""
    return NspawnBackend(
        sandbox.nspawn, sandbox, settings.image, cache_dir(settings), settings.data_dir / "nspawn", settings.sensor,
        files or None, attach, netns,
    )  # fmt: skip


# sandbox.backend -> how to build it from the settings (and the capture gateway, network.mode: capture);
# config.SandboxSettings refuses a name not here.
BACKENDS: dict[str, Callable[[Settings, Gateway | None], SandboxBackend]] = {
    "docker": _docker,
    "microvm": _microvm,
    "nspawn": _nspawn,
}


def build_backend(settings: Settings, gateway: Gateway | None = None) -> SandboxBackend:
    build = BACKENDS.get(settings.sandbox.backend)
    if build is None:  # config.AVAILABLE_BACKENDS and BACKENDS name the same backends (a unit test checks)
        raise ConfigError(f"sandbox.backend: {settings.sandbox.backend} is not available; set sandbox.backend: docker")
    return build(settings, gateway)


class Listener(Protocol):
    """A front end other than SSH's (telnet, raw tcp/udp): started, asked its port, closed."""

    @property
    def port(self) -> int: ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


def _bounds(service: ServiceSettings) -> ServiceBounds:
    return ServiceBounds(service.name, service.session.timeout_seconds, service.session.max_bytes, service.persona)


def _raw(service: ServiceSettings) -> RawService:
    assert service.target_port is not None  # config: tcp/udp services have one
    return RawService(
        service.name,
        service.protocol,
        service.target_port,
        pcap=service.capture.pcap,
        metadata=service.capture.metadata,
        max_bytes=service.session.max_bytes,
        timeout_s=service.session.timeout_seconds,
        idle_timeout_s=service.session.idle_timeout_seconds or 60.0,
        persona=service.persona,
    )


def build_listeners(settings: Settings, hub: Hub, policy: AuthPolicy) -> dict[str, Listener]:
    """Every configured listener but SSH's (the SSH front end is built on its own: it has the host keys)."""
    out: dict[str, Listener] = {}
    for service in settings.listeners():
        if service.protocol == "telnet":
            ctx = TelnetContext(hub, settings.telnet, policy, settings.sandbox.hostname, _bounds(service))
            out[service.name] = TelnetFrontEnd(ctx, service.address)
        elif service.protocol == "tcp":
            out[service.name] = TCPFrontEnd(hub, _raw(service), service.address)
        elif service.protocol == "udp":
            out[service.name] = UDPFrontEnd(hub, _raw(service), service.address)
    return out


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
    listeners: dict[str, Listener] = field(default_factory=dict)  # telnet, tcp, udp services by name
    alerts: AlertSink | None = None

    def port(self, service: str) -> int:
        """The port a service listens on (its configured one, or the one port 0 got)."""
        if service in self.listeners:
            return self.listeners[service].port
        return self.ssh.port


@contextlib.asynccontextmanager
async def running(
    settings: Settings, progress: Progress | None = None, sinks: list[EventSink] | None = None
) -> AsyncIterator[Services]:
    """Start every service; stop them all (gracefully) on exit."""
    check_exposure(settings)  # ConfigError: a non-loopback api.listen needs api.token
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    gateway = None
    if settings.network.mode == "capture":
        docker = settings.sandbox.docker
        if settings.sandbox.backend == "docker" and not engine.is_local(docker):
            raise ConfigError(
                f"network.mode: capture links each box to a namespace on this host; the engine at "
                f"{engine.address(docker)} is not on it. Fix: use the local engine, or set network.mode: none"
            )
        gateway = Gateway(settings.network, settings.sensor, settings.data_dir)
    raw = [s.name for s in settings.listeners() if s.is_raw]
    if raw and settings.sandbox.backend == "docker" and not engine.is_local(settings.sandbox.docker):
        raise ConfigError(
            f"service {raw[0]}: a tcp/udp service reaches the box's port from this host; the engine at "
            f"{engine.address(settings.sandbox.docker)} is not on it. Fix: use the local engine, or remove the service"
        )
    backend = build_backend(settings, gateway)
    personas = settings.effective_personas()
    pool: Pool[Prepared] = Pool(
        backend,
        settings.sandbox,
        settings.data_dir / "sandboxes",
        personas=[(box_persona(settings, p), p.weight) for p in personas],
        pinned=[s.persona for s in settings.services if s.persona],
    )
    bus = EventBus()
    for sink in sinks or []:
        bus.add_sink(sink)
    if gateway is not None:
        bus.add_sink(gateway.commands)  # a download's destfile: the command line that asked for it
    manager = SessionManager(pool, settings.sandbox, settings.limits, settings.sandbox.honeytokens, personas)
    # Done while a box waits warm, not while the attacker does: honeytokens planted, accounts read.
    pool.prepare = manager.prepare
    if isinstance(backend, DockerBackend) and backend.disk is not None:  # a box past its disk bound: its sessions end
        backend.disk.report = lambda overrun: manager.overrun(overrun.sandbox_id, overrun.reason, overrun.bytes)
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
    # Spills to the JSON log when its buffer is full and replays from it: the log must be a sink of the bus too.
    database = DatabaseSink(url, settings.storage.buffer_events, jsonlog=jsonlog)
    repository = Repository(url)
    recording.database_status = database.status
    # Events written while the database was unreachable reach it now; then close what a crash left open.
    await asyncio.to_thread(database.catch_up_from_jsonlog)
    bus.add_sink(database)
    metrics = MetricsSink(pool.stats, database.status, recording.status)
    bus.add_sink(metrics)
    # Alerts: write() only queues; the targets' workers start with the services (alerts.start below).
    alerts = AlertSink(settings.alerts, settings.data_dir)
    metrics.registry.register(alerts)
    bus.add_sink(alerts)
    trimmer = MemoryTrim()  # freed session memory back to the system a little after sessions close
    bus.add_sink(trimmer)
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
        network=gateway,
    )
    policy = AuthPolicy(settings.auth)  # one policy: a password tried over telnet counts for SSH too
    services = settings.listeners()
    ssh_service = next((s for s in services if s.protocol == "ssh"), None)
    ctx = ServerContext(hub, settings.ssh, settings.auth, policy, _bounds(ssh_service) if ssh_service else None)
    ssh = SSHFrontEnd(ctx, settings.data_dir)
    listeners = build_listeners(settings, hub, policy)
    # A raw service proxies into the box its IP's logins get: boxes are shared per source IP (ip_ttl_s).
    manager.share_by_ip = any(s.is_raw for s in services)
    api_deps = ApiDeps(
        settings,
        repository,
        live=hub.live,
        pool_stats=pool.stats,
        engine_ping=backend.ping,
        storage_status=database.status,
        recording_status=recording.status,
        metrics=metrics.registry,
        alerts_status=alerts.status,
    )
    api_app = create_app(api_deps)
    api = ApiServer(api_app, settings.api.listen)
    try:
        await alerts.start()
        await backend.ping()
        if gateway is not None:
            await gateway.start()  # before the first box: each gets its eth0 there
        await pool.start(progress)
        if ssh_service is not None:
            await ssh.start()
        for listener in listeners.values():
            await listener.start()
        await api.start()
        yield Services(
            settings,
            backend,
            pool,
            bus,
            manager,
            ssh,
            database,
            repository,
            jsonlog,
            ctx,
            metrics,
            api_app,
            api,
            listeners,
            alerts,
        )
    finally:
        log.info("shutting down: closing listeners, stopping sandboxes")
        await asyncio.shield(api.close())
        for listener in listeners.values():
            await asyncio.shield(listener.close())
        await asyncio.shield(ssh.close())
        await asyncio.shield(hub.drain())
        await asyncio.shield(manager.close())
        await asyncio.shield(pool.close())
        await asyncio.shield(alerts.close())
        await asyncio.shield(trimmer.close())
        await backend.close()
        if gateway is not None:
            await asyncio.shield(gateway.close())
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
