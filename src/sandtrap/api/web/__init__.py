"""The web UI: server-rendered pages for analysts, on the same FastAPI app as the REST API.

``mount(app, deps)`` adds the pages (``/``, ``/sessions``, ``/sessions/{id}``, ``/login``) and their
assets under ``/static``; the front-end packages in ``static/vendor`` come from
``scripts/web-assets.sh`` (nothing is loaded from another origin at run time).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles

from sandtrap.api.deps import ApiDeps
from sandtrap.api.web.pages import Pages

STATIC = Path(__file__).resolve().parent / "static"
VENDOR = STATIC / "vendor"


def mount(app: FastAPI, deps: ApiDeps) -> None:
    app.include_router(Pages(deps).router())
    app.mount("/static", StaticFiles(directory=STATIC), name="static")


def has_vendor_assets() -> bool:
    return (VENDOR / "asciinema-player.min.js").is_file() and (VENDOR / "asciinema-player.css").is_file()


__all__ = ["STATIC", "VENDOR", "has_vendor_assets", "mount"]
