"""Fixtures for integration and realism tests: the real engine and image, a real honeypot, cleanup by label."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nspawn_fixtures import CACHE as NSPAWN_CACHE
from nspawn_fixtures import remove_nspawn_boxes
from sandtrap.app import Services, running
from sandtrap.config import DockerSettings, NetworkSettings, SandboxSettings, Settings, load_settings, merge
from sandtrap.events import CaptureSink, Event
from sandtrap.sandbox.docker import seccomp
from sandtrap.sandbox.docker.backend import DockerBackend

from conftest_image import built_image  # noqa: F401  (session fixture: builds/reuses the image)
from helpers import DATA_DIR, remove_sensor_containers, seccomp_profile


@pytest.fixture
def sensor() -> str:
    """A sensor name unique to the test: its containers carry it as a label and are removed after."""
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
def sandbox_settings(built_image: str) -> Callable[..., SandboxSettings]:
    def make(docker: dict[str, Any] | None = None, **overrides: Any) -> SandboxSettings:
        """``sandbox`` keys as keywords, ``sandbox.docker`` ones in ``docker``."""
        section = DockerSettings(**{"image": built_image, **(docker or {})})
        return SandboxSettings(**{"init": INIT, **overrides, "docker": section})

    return make


@pytest.fixture
async def backend_factory(sensor: str) -> AsyncIterator[Callable[[SandboxSettings], DockerBackend]]:
    made: list[DockerBackend] = []

    def make(settings: SandboxSettings, files: Mapping[str, tuple[bytes, int, float]] | None = None) -> DockerBackend:
        b = DockerBackend(settings.docker, settings, sensor, seccomp_profile(settings.docker.seccomp_profile), files)
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            await b.close()
        await remove_sensor_containers(sensor)


@pytest.fixture
async def backend(
    backend_factory: Callable[[SandboxSettings], DockerBackend], sandbox_settings: Callable[..., SandboxSettings]
) -> DockerBackend:
    return backend_factory(sandbox_settings())


@pytest.fixture
def tmp_state(tmp_path: Path) -> Path:
    return tmp_path / "sandboxes"


@dataclass
class Honeypot:
    """A running honeypot (in this process) on a loopback port, with every event captured."""

    settings: Settings
    services: Services
    capture: CaptureSink
    # Logins that fell back to docker exec with session_transport: init (the backend's warnings).
    fallbacks: list[str] = field(default_factory=list)
    expect_fallback: bool = False

    @property
    def port(self) -> int:
        return self.services.ssh.port

    def events(self, eventid: str | None = None, session: str | None = None) -> list[Event]:
        return [
            e
            for e in self.capture.events
            if (eventid is None or e.eventid == eventid) and (session is None or e.session == session)
        ]

    async def wait_for(self, eventid: str, count: int = 1, timeout_s: float = 30.0, **fields: Any) -> list[Event]:
        """Wait until ``count`` events of ``eventid`` (with matching fields) were emitted."""
        async with asyncio.timeout(timeout_s):
            while True:
                found = [e for e in self.events(eventid) if all(e.get(k) == v for k, v in fields.items())]
                if len(found) >= count:
                    return found
                await asyncio.sleep(0.05)


@pytest.fixture
async def honeypot(built_image: str, sensor: str, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Factory: ``hp = await honeypot(auth={...}, sandbox={...})`` starts one; all stop after the test."""
    stack = contextlib.AsyncExitStack()

    async def start(**overrides: Any) -> Honeypot:
        base: dict[str, Any] = {
            "sensor": sensor,
            "ssh": {"listen": "127.0.0.1:0", "host_key_dir": str(HOST_KEYS)},
            # SANDTRAP_TEST_SESSION_TRANSPORT=init runs a suite with logins started by the box's listener.
            # SANDTRAP_TEST_NETWORK=internal: every box of the suite on the internal network (eth0, no way out).
            # SANDTRAP_TEST_INIT=systemd with systemd as the boxes' PID 1.
            # SANDTRAP_TEST_BACKEND=nspawn: every honeypot of the suite on the nspawn backend (its tree built once).
            **NSPAWN,
            "sandbox": {
                "backend": BACKEND,
                "docker": {"image": built_image},
                "pool_size": 1,
                # The suite's tests were written for a box per connection (they count boxes, compare sessions'
                # boxes); tests of the default (source_ip) pass it: tests/integration/test_capacity.py.
                "affinity": "session",
                "session_transport": SESSION_TRANSPORT,
                "init": INIT,
            },
            "network": {"mode": NETWORK},
            "storage": {"data_dir": str(tmp_path / "data")},
            "api": {"listen": "127.0.0.1:0"},
            # No PAM-like delays in tests (test_auth_timing checks them): brute-force tests stay fast.
            "auth": {
                "credentials": [{"username": "root", "password": "hunter2"}],
                "accept_all_after": 0,
                "failure_delay_s": 0,
                "success_delay_s": 0,
            },
        }
        merged = merge(base, overrides)
        # A fixed pool (pool_max = pool_size) unless the test says otherwise: the suite's tests count containers;
        # the pool's sizing has tests of its own (tests/unit/sandbox/test_sizing.py, test_capacity.py).
        merged["sandbox"].setdefault("pool_max", merged["sandbox"]["pool_size"])
        settings = load_settings(None, merged)
        # The default profile (`sandtrap`): the checkout's data dir's own, if an earlier set-up left one there,
        # copied in; else the test's data dir falls back to the one `make setup` installed for every data dir.
        made = seccomp.profile_path(DATA_DIR)
        if made.exists() and not seccomp.profile_path(settings.data_dir).exists():
            seccomp.profile_path(settings.data_dir).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(made, seccomp.profile_path(settings.data_dir))
        capture = CaptureSink()
        services = await stack.enter_async_context(running(settings, sinks=[capture]))
        hp = Honeypot(settings, services, capture)
        started.append(hp)
        return hp

    started: list[Honeypot] = []
    fallbacks = _FallbackLog()
    docker_log = logging.getLogger("sandtrap.sandbox.docker")
    docker_log.addHandler(fallbacks)
    try:
        yield start
    finally:
        docker_log.removeHandler(fallbacks)
        await stack.aclose()
        await remove_sensor_containers(sensor)
        if BACKEND == "nspawn":  # every honeypot's data dir: a test may give one its own (test_auth_timing)
            for root in {tmp_path / "data" / "nspawn", *(hp.settings.data_dir / "nspawn" for hp in started)}:
                await remove_nspawn_boxes(root)
    if fallbacks.lines and not any(hp.expect_fallback for hp in started):
        pytest.fail(f"logins fell back to docker exec, or boxes to sandtrap's init: {fallbacks.lines[:3]}")


class _FallbackLog(logging.Handler):
    """Collects the backend's "login ... by docker exec" warnings (session_transport: init fell back) and its
    "keeps sandtrap's init" ones (init: systemd fell back)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if "by docker exec" in text or "keeps sandtrap's init" in text:
            self.lines.append(text)


SESSION_TRANSPORT = os.environ.get("SANDTRAP_TEST_SESSION_TRANSPORT", SandboxSettings().session_transport)
NETWORK = os.environ.get("SANDTRAP_TEST_NETWORK", NetworkSettings().mode)
INIT = os.environ.get("SANDTRAP_TEST_INIT", SandboxSettings().init)
BACKEND = os.environ.get("SANDTRAP_TEST_BACKEND", SandboxSettings().backend)
NSPAWN: dict[str, Any] = {"image": {"cache_dir": str(NSPAWN_CACHE)}} if BACKEND == "nspawn" else {}


# Host keys are generated once per test run (RSA 3072 takes a moment) and shared by every honeypot.
HOST_KEYS = Path(tempfile.gettempdir()) / f"sandtrap-test-hostkeys-{os.getpid()}"
