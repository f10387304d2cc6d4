"""Integration fixtures: the real Docker engine, the real image, containers cleaned up by label."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.docker import DockerBackend

from conftest_image import built_image  # noqa: F401  (session fixture: builds/reuses the image)
from helpers import remove_sensor_containers


@pytest.fixture
def sensor() -> str:
    """A sensor name unique to the test: its containers carry it as a label and are removed after."""
    return f"test-{secrets.token_hex(4)}"


@pytest.fixture
def sandbox_settings(built_image: str) -> Callable[..., SandboxSettings]:
    def make(**overrides: Any) -> SandboxSettings:
        return SandboxSettings(image=built_image, **overrides)

    return make


@pytest.fixture
async def backend_factory(sensor: str) -> AsyncIterator[Callable[[SandboxSettings], DockerBackend]]:
    made: list[DockerBackend] = []

    def make(settings: SandboxSettings) -> DockerBackend:
        b = DockerBackend(settings, sensor)
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
