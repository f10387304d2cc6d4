"""The analyst's pages: dashboard, sessions (search, filters, pages), one session (replay, commands, files).

Each handler reads through the blocking repository in a thread and renders a template; the data
stays attacker text all the way (autoescaped in HTML, :func:`json_script` for JavaScript). The API's
token gate (``sandtrap.api.auth``) stands in front of these pages as of everything else.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from sandtrap.api.deps import ApiDeps
from sandtrap.api.web import detail, listing, timeline
from sandtrap.api.web.renderer import Renderer
from sandtrap.storage.engine import StorageError
from sandtrap.storage.records import SensorInfo

log = logging.getLogger(__name__)

TOP = 10
RECENT = 10


class Pages:
    def __init__(self, deps: ApiDeps, renderer: Renderer | None = None) -> None:
        self.deps = deps
        self.renderer = renderer or Renderer()

    def router(self) -> APIRouter:
        r = APIRouter(include_in_schema=False)
        r.add_api_route("/", self.dashboard, methods=["GET"])
        r.add_api_route("/sessions", self.sessions, methods=["GET"])
        r.add_api_route("/sessions/{session_id}", self.session, methods=["GET"])
        return r

    # -- pages ------------------------------------------------------------------------------------------
    async def dashboard(self, request: Request) -> Response:
        range_name = request.query_params.get("range", "7d")
        if range_name not in timeline.RANGES:
            range_name = "7d"
        now = datetime.now(UTC)
        _, span, _ = timeline.RANGES[range_name]
        # The totals and tops cover the chart's window exactly (its first bucket included).
        since = timeline.window(range_name, [], now)[0] if span else None
        hours = int((now - since) / timedelta(hours=1)) + 2 if since else 24 * 400
        repo = self.deps.repository
        sensor, sensor_error = listing.parse_sensor(request.query_params.get("sensor", ""))
        try:
            sensors = await asyncio.to_thread(repo.sensors)
            stats = await asyncio.to_thread(lambda: repo.stats(TOP, since=since, hours=hours, sensor=sensor))
            recent = await asyncio.to_thread(lambda: repo.list_sessions(limit=RECENT, sensor=sensor))
        except StorageError as exc:
            return self._unavailable(request, exc)
        start, end, step = timeline.window(range_name, stats.sessions_per_hour, now)
        chart = timeline.chart(timeline.fill_hours(stats.sessions_per_hour, start, end, step))
        context = {
            "stats": stats,
            "chart": chart,
            "range": range_name,
            "ranges": {k: v[0] for k, v in timeline.RANGES.items()},
            "recent": recent,
            "live_ids": self._live_ids(s.id for s in recent),
            "status": self._status(),
            **_sensor_context(sensors, sensor),
            "sensor_rows": sensors,
            "sensor_error": sensor_error,
        }
        return self._page(request, "dashboard.html", context, nav="dashboard")

    async def sessions(self, request: Request) -> Response:
        query = listing.parse_query(request.query_params, datetime.now(UTC))
        repo = self.deps.repository
        try:
            sensors = await asyncio.to_thread(repo.sensors)
            total = await asyncio.to_thread(lambda: repo.count_sessions(**query.filters))
            rows = await asyncio.to_thread(
                lambda: repo.list_sessions(**query.filters, limit=query.per_page, offset=query.offset, sort=query.sort)
            )
        except StorageError as exc:
            return self._unavailable(request, exc)
        context = {
            "q": query,
            "sessions": rows,
            "pager": listing.Pager(total, query.page, query.per_page),
            "sorts": listing.SORTS,
            "page_sizes": listing.PAGE_SIZES,
            "live_ids": self._live_ids(s.id for s in rows),
            **_sensor_context(sensors, query.filters["sensor"]),
        }
        return self._page(request, "sessions.html", context, nav="sessions")

    async def session(self, request: Request, session_id: str) -> Response:
        try:
            found = await asyncio.to_thread(self.deps.repository.get_session, session_id)
        except StorageError as exc:
            return self._unavailable(request, exc)
        if found is None:
            return self._error(request, 404, "No such session", f"There is no session {session_id!r}.")
        recs = detail.recordings(found)
        placed = detail.place_commands(found, recs)
        artifacts, changed = detail.split_artifacts(found.artifacts)
        changed, bookkeeping = detail.split_changed(changed)
        live = None
        hub = self.deps.live
        if hub is not None and hub.is_live(found.id):
            term = hub.size(found.id)
            live = {
                "url": detail.api_session_path(found.id) + "/live",
                "cols": term.cols if term else 80,
                "rows": term.rows if term else 24,
            }
        context = {
            "s": found,
            "recordings": recs,
            "commands": placed,
            "artifacts": artifacts,
            "changed": changed,
            "bookkeeping": bookkeeping,
            "live": live,
            "player": detail.player_data(found, recs, placed, live),
            "artifact_url": detail.artifact_url,
            "format_offset": detail.format_offset,
            "api_path": detail.api_session_path(found.id),
            "pcap_bytes": await asyncio.to_thread(detail.pcap_bytes, self.deps.data_dir, found.id),
        }
        return self._page(request, "session.html", context, nav="sessions", player=True)

    # -- helpers ----------------------------------------------------------------------------------------
    def _page(
        self,
        request: Request,
        template: str,
        context: dict[str, Any],
        nav: str,
        status_code: int = 200,
        player: bool = False,
    ) -> Response:
        base = {
            "nav": nav,
            "sensor": self.deps.settings.sensor,
            "has_token": bool(self.deps.settings.api.token),
            "path": request.url.path,
        }
        return self.renderer.page(template, {**base, **context}, status_code=status_code, player=player)

    def _error(self, request: Request, status_code: int, title: str, message: str) -> Response:
        context = {"title": title, "message": message}
        return self._page(request, "error.html", context, nav="", status_code=status_code)

    def _unavailable(self, request: Request, exc: StorageError) -> Response:
        log.warning("web page %s: %s", request.url.path, exc)
        return self._error(request, 503, "Storage unavailable", "The database did not answer; try again shortly.")

    def _live_ids(self, ids: Any) -> set[str]:
        hub = self.deps.live
        return {i for i in ids if hub is not None and hub.is_live(i)}

    def _status(self) -> dict[str, Any]:
        """The pool's numbers at render time (the page then polls /api/v1/status)."""
        if self.deps.pool_stats is None:
            return {}
        try:
            return {"pool": self.deps.pool_stats()}
        except Exception:  # a status line must not take the dashboard down
            log.exception("pool_stats failed")
            return {}


def _sensor_context(sensors: list[SensorInfo], chosen: str | None) -> dict[str, Any]:
    """The sensor filter's choices (every sensor the database knows, and the chosen one even if it knows none
    of its sessions yet), the choice, the query to keep it in links, and whether rows need a sensor column."""
    names = [s.sensor for s in sensors]
    if chosen is not None and chosen not in names:
        names.append(chosen)
    return {
        "sensors": names,
        "sensor_filter": chosen,
        "keep": listing.sensor_param(chosen),
        "show_sensor": chosen is None and len(names) > 1,
    }
