"""``GET /api/v1/sessions/{id}/live``: an active session's terminal as server-sent events, read-only.

Each ``message`` event's data is one JSON frame ``[t, kind, data]`` as the recorder writes it (``"o"``
output, ``"r"`` a resize ``"COLSxROWS"``); the first frame is the current size. An ``end`` event
(data ``{"reason": ...}``) closes the stream: when the session ends, when it was not live to begin
with, or after ``limits.max_duration_s`` (no session lasts longer). Watchers never slow the session:
the hub drops frames for a watcher that falls behind.
"""

# No ``from __future__ import annotations`` here: FastAPI reads these signatures at run time.

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException
from fastapi.sse import EventSourceResponse, ServerSentEvent

from sandtrap.api.deps import ApiDeps
from sandtrap.api.routes import SessionId

END = "end"
_PROBLEM = {"application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}}
# Spelled out: with the route's response_class, FastAPI would document these as text/event-stream.
ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"description": "no such session, or no live view in this process", "content": _PROBLEM},
    503: {"description": "the database is unavailable", "content": _PROBLEM},
}


def end(reason: str) -> ServerSentEvent:
    return ServerSentEvent(event=END, data={"reason": reason})


def live_router(deps: ApiDeps, stopping: asyncio.Event) -> APIRouter:
    """``stopping`` ends every stream (the API server sets it when it shuts down)."""
    router = APIRouter(prefix="/api/v1", responses=ERRORS, generate_unique_id_function=lambda route: route.name)

    async def watchable(session_id: SessionId) -> str:
        if deps.live is None:
            raise HTTPException(404, "no live view here: it is served by `sandtrap run`, not `sandtrap api`")
        if deps.live.is_live(session_id):
            return session_id
        if await asyncio.to_thread(deps.repository.get_session, session_id) is None:
            raise HTTPException(404, f"no session {session_id}")
        return session_id

    @router.get(
        "/sessions/{session_id}/live",
        tags=["sessions"],
        response_class=EventSourceResponse,
    )
    async def watch_session(session_id: Annotated[str, Depends(watchable)]) -> AsyncIterator[ServerSentEvent]:
        """Watch an active session's terminal live (server-sent events; an ``end`` event closes it)."""
        hub = deps.live
        # Check and subscribe with no await between: the hub only tracks sessions that are open.
        if hub is None or not hub.is_live(session_id):
            yield end("not_live")
            return
        limit_s = deps.settings.limits.max_duration_s + 1.0  # the session itself ends by then
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit_s
        with hub.watch(session_id) as queue:
            size = hub.size(session_id)
            if size is not None:
                yield ServerSentEvent(data=[0.0, "r", f"{size.cols}x{size.rows}"])
            while True:
                frame = await _next_frame(queue, stopping, deadline - loop.time())
                if frame == "stopping":
                    yield end("server_stopping")
                    return
                if frame == "timeout":
                    yield end("max_duration_s")
                    return
                if frame is None:
                    yield end("closed")
                    return
                yield ServerSentEvent(data=frame)

    return router


async def _next_frame(queue: asyncio.Queue[list[Any] | None], stopping: asyncio.Event, timeout_s: float) -> Any:
    """The next frame, ``None`` at the session's end, or ``"stopping"`` / ``"timeout"``."""
    if stopping.is_set():
        return "stopping"
    if not queue.empty():
        return queue.get_nowait()
    get = asyncio.ensure_future(queue.get())
    stop = asyncio.ensure_future(stopping.wait())
    try:
        done, _ = await asyncio.wait({get, stop}, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (get, stop):
            if not task.done():
                task.cancel()
    if get in done:
        return get.result()
    return "stopping" if stop in done else "timeout"
