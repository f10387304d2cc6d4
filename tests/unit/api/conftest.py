"""API unit fixtures: a SQLite database filled through the real DatabaseSink, files under a data dir,
and the app behind httpx's ASGI transport (no sockets).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandtrap.api.app import create_app
from sandtrap.api.deps import ApiDeps
from sandtrap.config import Settings, load_settings
from sandtrap.outputs.database import DatabaseSink
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository

sys.path.insert(0, str(Path(__file__).resolve().parent))

from apidata import CAST_TEXT, SHA_UPLOAD, UPLOAD, A, Recorded, recorded_events


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(None, {"storage": {"data_dir": str(tmp_path / "data")}, "sensor": "sensor-1"})


@pytest.fixture(scope="session")
def recorded_database(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The three sessions stored once, through the real sink; each test gets a copy."""
    path = tmp_path_factory.mktemp("recorded") / "sandtrap.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    sink = DatabaseSink(url)
    try:
        for event in recorded_events():
            sink.write(event)
        assert sink.flush(30), sink.status()
    finally:
        sink.close(5)
    return path


@pytest.fixture
def recorded(settings: Settings, recorded_database: Path) -> Iterator[Recorded]:
    """The three sessions stored; session A's cast and upload on disk."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    for part in recorded_database.parent.glob(recorded_database.name + "*"):
        shutil.copy(part, settings.data_dir / part.name)
    cast = settings.data_dir / "casts" / f"{A}-0.cast"
    cast.parent.mkdir(parents=True, exist_ok=True)
    cast.write_text(CAST_TEXT)
    artifact = settings.data_dir / "artifacts" / SHA_UPLOAD[:2] / SHA_UPLOAD
    artifact.parent.mkdir(parents=True, exist_ok=True)
    artifact.write_bytes(UPLOAD)
    repository = Repository(settings.database_url)
    try:
        yield Recorded(settings, repository)
    finally:
        repository.close()


@pytest.fixture
async def client(recorded: Recorded) -> AsyncIterator[Callable[..., httpx.AsyncClient]]:
    """Factory: ``client(token="...", live=hub, ...)``: an httpx client on a fresh app (closed after)."""
    made: list[httpx.AsyncClient] = []

    def make(token: str = "", repository: Repository | None = None, **deps: Any) -> httpx.AsyncClient:
        api = recorded.settings.api.model_copy(update={"token": token})
        settings = recorded.settings.model_copy(update={"api": api})
        app = create_app(ApiDeps(settings, repository or recorded.repository, **deps))
        c = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver")
        c.app = app  # type: ignore[attr-defined]
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            await c.aclose()
