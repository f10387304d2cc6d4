"""Fixtures of the nspawn backend's integration tests: the tree (built once per test session from the test image)
and backends of one sensor each test, whose boxes (state directories, mounts, cgroups) are removed after it."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sandtrap.config import ImageSettings, NspawnSettings, SandboxSettings, Settings
from sandtrap.sandbox.nspawn.backend import NspawnBackend
from sandtrap.sandbox.nspawn.image import build_tree

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "data" / "cache"

needs_nspawn = [
    pytest.mark.skipif(os.geteuid() != 0, reason="nspawn boxes need root (mounts, namespaces)"),
    pytest.mark.skipif(shutil.which("systemd-nspawn") is None, reason="apt-get install systemd-container"),
]


@pytest.fixture(scope="session")
def nspawn_tree() -> Path:
    settings = Settings()
    tag = os.environ.get("SANDTRAP_TEST_IMAGE") or settings.sandbox.docker.image
    tree, _built = asyncio.run(build_tree(settings.image, tag, CACHE, console=Console(stderr=True, quiet=True)))
    return tree


@pytest.fixture
async def nspawn_factory(nspawn_tree: Path, tmp_path: Path, sensor: str) -> AsyncIterator[Callable[..., NspawnBackend]]:
    """``make(**sandbox_overrides)``: a backend on this test's own state directory (a second one finds the
    boxes of the first, as a restarted honeypot does)."""
    made: list[NspawnBackend] = []
    root = tmp_path / "nspawn"

    def make(nspawn: dict[str, Any] | None = None, **overrides: Any) -> NspawnBackend:
        box = SandboxSettings(**{"backend": "nspawn", **overrides, "nspawn": NspawnSettings(**(nspawn or {}))})
        b = NspawnBackend(box.nspawn, box, ImageSettings(), CACHE, root, sensor)
        made.append(b)
        return b

    try:
        yield make
    finally:
        for b in made:
            for info in await b.list_managed():
                await b.sandbox(info.id, info.name).remove()
            await b.close()


@pytest.fixture
async def nspawn_cleanup(tmp_path: Path) -> AsyncIterator[None]:
    """After a test's honeypots have closed (request it before ``honeypot``): every box left under the test's
    ``hp`` data dir (stopped boxes kept for forensics) removed, so no mount or process outlives the test."""
    yield
    await remove_nspawn_boxes(tmp_path / "hp" / "nspawn")


async def remove_nspawn_boxes(root: Path) -> None:
    """Every box under a honeypot's ``<data_dir>/nspawn`` removed (stopped ones too: mounts, cgroups, state)."""
    if root.exists():
        backend = NspawnBackend(NspawnSettings(), SandboxSettings(backend="nspawn"), ImageSettings(), CACHE, root, "x")
        for info in await backend.list_managed():
            await backend.sandbox(info.id, info.name).remove()
        await backend.close()
