"""``sandtrap api``: the API (and web UI) alone against the configured storage, for a central console.

No honeypot runs in this process: no pool, no engine, no live view, no metrics (those answer 404 or
null). Casts and artifacts are served from this machine's ``storage.data_dir``.
"""

from __future__ import annotations

import asyncio
import signal

from sandtrap.api.app import create_app
from sandtrap.api.deps import ApiDeps
from sandtrap.api.server import ApiServer, check_exposure
from sandtrap.config import Settings
from sandtrap.storage.migrate import upgrade
from sandtrap.storage.repository import Repository


async def serve_console(settings: Settings) -> None:
    """Serve until SIGINT/SIGTERM."""
    check_exposure(settings)
    await asyncio.to_thread(upgrade, settings.database_url)  # a fresh database gets its tables
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    with Repository(settings.database_url) as repository:
        server = ApiServer(create_app(ApiDeps(settings, repository)), settings.api.listen)
        await server.start()
        try:
            await stop.wait()
        finally:
            await asyncio.shield(server.close())
