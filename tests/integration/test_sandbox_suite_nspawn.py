"""The conformance suite (tests/sandbox_suite.py) on the nspawn backend: real systemd-nspawn, real overlays; every
box a test makes is removed afterwards (``nspawn_factory``)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from nspawn_fixtures import needs_nspawn, nspawn_factory, nspawn_tree  # noqa: F401  (fixtures)
from sandtrap.sandbox.base import SandboxBackend
from sandtrap.sandbox.nspawn.backend import NspawnBackend

from sandbox_suite import *  # noqa: F403  (the suite's tests and fixtures, collected here)
from sandbox_suite import MakeBackend

pytestmark = [*needs_nspawn, pytest.mark.timeout(300)]


@pytest.fixture
def make_backend(nspawn_factory: Callable[..., NspawnBackend]) -> MakeBackend:
    def make() -> SandboxBackend:
        return nspawn_factory()

    return make
