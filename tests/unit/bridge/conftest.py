"""Bridge unit tests run on the fake that behaves like a box (tests/fakes.py ChrootBackend)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sandtrap.sandbox.base import Sandbox

from fakes import ChrootBackend


@pytest.fixture
async def chroot_backend(tmp_path: Path) -> AsyncIterator[ChrootBackend]:
    """A backend of box directories under the test's tmp_path; every box it made is removed after the test."""
    backend = ChrootBackend(tmp_path / "boxes")
    try:
        yield backend
    finally:
        await backend.close()
        for info in await backend.list_managed():
            await backend.sandbox(info.id, info.name).remove()


@pytest.fixture
async def box(chroot_backend: ChrootBackend) -> Sandbox:
    return await chroot_backend.create()
