"""The conformance suite (tests/sandbox_suite.py) on the fake that behaves like a box (tests/fakes.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandtrap.sandbox.base import Sandbox, SandboxBackend

import sandbox_suite as suite
from fakes import ROOTLESS, ChrootBackend
from sandbox_suite import *  # noqa: F403  (the suite's tests and fixtures, collected here)
from sandbox_suite import MakeBackend


@pytest.fixture
async def make_backend(tmp_path: Path) -> AsyncIterator[MakeBackend]:
    made: list[ChrootBackend] = []

    def make() -> SandboxBackend:
        backend = ChrootBackend(tmp_path / "boxes", sensor="suite")
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        for backend in made:
            await backend.close()
        cleaner = ChrootBackend(tmp_path / "boxes", sensor="suite")
        for info in await cleaner.list_managed():
            await cleaner.sandbox(info.id, info.name).remove()
        await cleaner.close()


@pytest.mark.skipif(ROOTLESS, reason="a rootless fake box maps one uid only")
async def test_exec_as_another_user(box: Sandbox) -> None:
    await suite.test_exec_as_another_user(box)
