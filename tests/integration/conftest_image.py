"""The sandbox image, built once per test session (a no-op when it is already current).

A plain module: ``conftest.py`` imports :func:`built_image` so every integration test can ask for it.
It uses the same tag and cache dir as the app's defaults, so tests and a local ``sandtrap`` share them;
``SANDTRAP_TEST_IMAGE`` names another tag (e.g. for a second checkout whose image inputs differ).
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
from rich.console import Console

from sandtrap.config import Settings
from sandtrap.sandbox.docker.image import build_image
from sandtrap.sandbox.nspawn.image import build_tree

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def built_image() -> str:
    settings = Settings()
    tag = os.environ.get("SANDTRAP_TEST_IMAGE") or settings.sandbox.docker.image
    cache_dir = ROOT / settings.storage.data_dir / "cache"
    console = Console(stderr=True, quiet=True)
    asyncio.run(build_image(settings.image, tag, cache_dir, console=console))
    if os.environ.get("SANDTRAP_TEST_BACKEND") == "nspawn":  # the nspawn boxes' tree, unpacked from that image
        asyncio.run(build_tree(settings.image, tag, cache_dir, console=console))
    return tag
