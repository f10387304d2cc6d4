"""The conformance suite (tests/sandbox_suite.py) on the Docker backend and the real engine, with this test's
own sensor: every box it makes is removed by label afterwards (``backend_factory``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.base import SandboxBackend
from sandtrap.sandbox.docker.backend import DockerBackend

from sandbox_suite import *  # noqa: F403  (the suite's tests and fixtures, collected here)
from sandbox_suite import MakeBackend


@pytest.fixture
def make_backend(
    backend_factory: Callable[[SandboxSettings], DockerBackend], sandbox_settings: Callable[..., SandboxSettings]
) -> MakeBackend:
    settings = sandbox_settings()

    def make() -> SandboxBackend:
        return backend_factory(settings)

    return make
