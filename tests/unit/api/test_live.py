"""The live view as server-sent events, driven through the ASGI interface message by message."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from sandtrap.bridge.live import LiveHub
from sandtrap.sandbox.base import TermSize

from apidata import A, Recorded, app_of

Client = Callable[..., httpx.AsyncClient]
LIVE = "fedcba987654"  # live in the hub, not yet in the database (its connect event may still be queued)


class Stream:
    """One request to the app; read what it sends, event by event."""

    def __init__(self, app: FastAPI, path: str) -> None:
        self.app, self.path = app, path
        self.sent: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.disconnect = asyncio.Event()
        self.buffer = b""
        self.status = 0
        self.headers: dict[str, str] = {}
        self.more = True

    async def receive(self) -> dict[str, Any]:
        await self.disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        await self.sent.put(message)

    def scope(self) -> dict[str, Any]:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},  # before 2.4: Starlette watches for the disconnect
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": self.path,
            "raw_path": self.path.encode(),
            "query_string": b"",
            "headers": [(b"host", b"testserver"), (b"accept", b"text/event-stream")],
            "server": ("testserver", 80),
            "client": ("127.0.0.1", 1234),
            "root_path": "",
        }

    async def start(self) -> None:
        message = await asyncio.wait_for(self.sent.get(), 10)
        assert message["type"] == "http.response.start"
        self.status = message["status"]
        self.headers = {k.decode(): v.decode() for k, v in message["headers"]}

    async def event(self) -> tuple[str, Any]:
        """The next event that is not a comment: (event name, decoded data)."""
        while True:
            while b"\n\n" not in self.buffer:
                assert self.more, f"stream ended; left: {self.buffer!r}"
                message = await asyncio.wait_for(self.sent.get(), 10)
                self.buffer += message.get("body", b"")
                self.more = message.get("more_body", False)
            block, self.buffer = self.buffer.split(b"\n\n", 1)
            name, data = "message", []
            for line in block.decode().split("\n"):
                if line.startswith("event: "):
                    name = line[7:]
                elif line.startswith("data: "):
                    data.append(line[6:])
            if data:
                return name, json.loads("\n".join(data))

    async def rest(self) -> bytes:
        while self.more:
            message = await asyncio.wait_for(self.sent.get(), 10)
            self.buffer += message.get("body", b"")
            self.more = message.get("more_body", False)
        return self.buffer


@asynccontextmanager
async def streaming(app: FastAPI, path: str) -> AsyncIterator[Stream]:
    stream = Stream(app, path)
    task = asyncio.create_task(app(stream.scope(), stream.receive, stream.send))
    try:
        await stream.start()
        yield stream
    finally:
        stream.disconnect.set()
        try:
            await asyncio.wait_for(task, 10)
        finally:
            task.cancel()


async def test_frames_then_end_when_the_session_closes(client: Client) -> None:
    hub = LiveHub()
    hub.open(LIVE, TermSize(100, 30))
    app = app_of(client(live=hub))
    async with streaming(app, f"/api/v1/sessions/{LIVE}/live") as s:
        assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
        assert await s.event() == ("message", [0.0, "r", "100x30"])  # subscribed once this arrives
        hub.publish(LIVE, "o", "root@box:~# \x1b]0;<script>\x07")
        hub.publish(LIVE, "r", "120x40")
        name, frame = await s.event()
        assert name == "message" and frame[1:] == ["o", "root@box:~# \x1b]0;<script>\x07"] and frame[0] >= 0
        assert (await s.event())[1][1:] == ["r", "120x40"]
        hub.close(LIVE)
        assert await s.event() == ("end", {"reason": "closed"})
        assert (await s.rest()).strip() == b""
    assert not hub.is_live(LIVE)


async def test_a_recorded_session_that_is_not_live_ends_at_once(client: Client) -> None:
    hub = LiveHub()
    async with streaming(app_of(client(live=hub)), f"/api/v1/sessions/{A}/live") as s:
        assert s.status == 200
        assert await s.event() == ("end", {"reason": "not_live"})
    assert not hub.is_live(A)  # watching did not make it look live


async def test_unknown_session_or_no_hub_is_404(client: Client) -> None:
    assert (await client(live=LiveHub()).get("/api/v1/sessions/ffffffffffff/live")).status_code == 404
    r = await client().get(f"/api/v1/sessions/{A}/live")
    assert r.status_code == 404 and "sandtrap run" in r.json()["detail"]


async def test_the_stream_ends_when_the_server_stops(client: Client) -> None:
    hub = LiveHub()
    hub.open(LIVE, TermSize(80, 24))
    app = app_of(client(live=hub))
    async with streaming(app, f"/api/v1/sessions/{LIVE}/live") as s:
        await s.event()
        app.state.stopping.set()
        assert await s.event() == ("end", {"reason": "server_stopping"})


async def test_the_stream_is_bounded_by_max_duration(client: Client, recorded: Recorded) -> None:
    hub = LiveHub()
    hub.open(LIVE, TermSize(80, 24))
    recorded.settings.limits.max_duration_s = 0.01
    app = app_of(client(live=hub))
    async with streaming(app, f"/api/v1/sessions/{LIVE}/live") as s:
        await s.event()
        assert await s.event() == ("end", {"reason": "max_duration_s"})
    hub.close(LIVE)


@pytest.mark.parametrize("watchers", [1, 3])
async def test_a_watcher_that_leaves_is_unsubscribed(client: Client, watchers: int) -> None:
    hub = LiveHub()
    hub.open(LIVE, TermSize(80, 24))
    app = app_of(client(live=hub))
    for _ in range(watchers):
        async with streaming(app, f"/api/v1/sessions/{LIVE}/live") as s:
            await s.event()
            hub.publish(LIVE, "o", "x")
            assert (await s.event())[1][2] == "x"
    # Every stream closed by the client: the hub still has the session, and no watcher queue left.
    assert hub.is_live(LIVE)
    with hub.watch(LIVE) as queue:
        hub.publish(LIVE, "o", "y")
        assert queue.qsize() == 1
