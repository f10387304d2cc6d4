"""Jinja2 with autoescaping on for every template, the page filters, and the headers every page carries.

Pages load scripts and styles from ``/static`` only: the Content-Security-Policy forbids inline
scripts, inline styles and every other origin, so an escaping mistake still cannot run script.
The session page adds ``'wasm-unsafe-eval'``: the replay player's terminal emulator is WebAssembly
(that keyword allows compiling WebAssembly, not ``eval`` of JavaScript).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.responses import HTMLResponse

from sandtrap.api.web.escaping import json_script, visible, visible_text

TEMPLATES = Path(__file__).resolve().parent / "templates"

CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)
CSP_WITH_PLAYER = CSP.replace("script-src 'self'", "script-src 'self' 'wasm-unsafe-eval'")
PAGE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def utc(moment: datetime | None, seconds: bool = True) -> str:
    if moment is None:
        return "—"
    return moment.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M")


def clock(moment: datetime | None) -> str:
    return "—" if moment is None else moment.strftime("%H:%M:%S")


def duration(ms: int | None) -> str:
    if ms is None:
        return "—"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def size(n: int | None) -> str:
    if n is None:
        return "—"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def thousands(n: int) -> str:
    return f"{n:,}".replace(",", "\u202f")


def make_environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,  # every template, whatever its name: no way to render data unescaped by accident
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        visible=visible,
        visible_text=visible_text,
        utc=utc,
        clock=clock,
        duration=duration,
        size=size,
        thousands=thousands,
    )
    env.globals.update(json_script=json_script)
    return env


class Renderer:
    def __init__(self, env: Environment | None = None) -> None:
        self.env = env or make_environment()

    def render(self, template: str, context: dict[str, Any]) -> str:
        return self.env.get_template(template).render(context)

    def page(
        self, template: str, context: dict[str, Any], status_code: int = 200, player: bool = False
    ) -> HTMLResponse:
        headers = {**PAGE_HEADERS, "Content-Security-Policy": CSP_WITH_PLAYER if player else CSP}
        return HTMLResponse(self.render(template, context), status_code=status_code, headers=headers)
