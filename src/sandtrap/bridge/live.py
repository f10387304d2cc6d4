"""Live view: what an active session's terminal shows, fanned out to read-only watchers.

A :class:`LiveTap` on each channel publishes output, input and resizes as asciicast-style frames
(``[t, "o", text]``) to the :class:`LiveHub`; the API streams them to browsers. Watchers get
bounded queues: a slow watcher loses frames (and is told so), it never slows the session.
"""

from __future__ import annotations

import asyncio
import codecs
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from sandtrap.sandbox.base import TermSize

QUEUE_FRAMES = 2000


@dataclass
class _Watcher:
    queue: asyncio.Queue[list[Any] | None]
    dropped: int = 0


@dataclass
class _Live:
    started: float = field(default_factory=time.monotonic)
    watchers: list[_Watcher] = field(default_factory=list)
    size: TermSize = field(default_factory=lambda: TermSize(80, 24))
    ended: bool = False


class LiveHub:
    def __init__(self) -> None:
        self._sessions: dict[str, _Live] = {}

    def is_live(self, session: str) -> bool:
        live = self._sessions.get(session)
        return live is not None and not live.ended

    def open(self, session: str, size: TermSize) -> None:
        live = self._sessions.setdefault(session, _Live())
        live.size, live.ended = size, False

    def publish(self, session: str, kind: str, data: str) -> None:
        live = self._sessions.get(session)
        if live is None or not live.watchers:
            return
        frame = [round(time.monotonic() - live.started, 6), kind, data]
        for w in live.watchers:
            try:
                w.queue.put_nowait(frame)
            except asyncio.QueueFull:
                w.dropped += 1

    def close(self, session: str) -> None:
        live = self._sessions.pop(session, None)
        if live is None:
            return
        live.ended = True
        for w in live.watchers:
            try:
                w.queue.put_nowait(None)
            except asyncio.QueueFull:
                w.dropped += 1

    def size(self, session: str) -> TermSize | None:
        live = self._sessions.get(session)
        return live.size if live else None

    @contextmanager
    def watch(self, session: str) -> Iterator[asyncio.Queue[list[Any] | None]]:
        """A queue of frames for ``session``; ``None`` marks its end. Unsubscribes on exit."""
        watcher = _Watcher(asyncio.Queue(QUEUE_FRAMES))
        live = self._sessions.get(session)
        if live is None or live.ended:  # not live: an ended stream, and no entry left behind
            watcher.queue.put_nowait(None)
            yield watcher.queue
            return
        live.watchers.append(watcher)
        try:
            yield watcher.queue
        finally:
            if watcher in live.watchers:
                live.watchers.remove(watcher)
            if not live.watchers and live.ended:
                self._sessions.pop(session, None)


class LiveTap:
    """A relay observer that publishes one channel's terminal to the hub."""

    def __init__(self, hub: LiveHub, session: str, size: TermSize) -> None:
        self._hub = hub
        self._session = session
        self._out = codecs.getincrementaldecoder("utf-8")("replace")
        hub.open(session, size)

    def on_input(self, data: bytes) -> None:
        pass  # watchers see what the attacker's terminal shows; keystrokes echo back as output

    def on_output(self, data: bytes, stderr: bool) -> None:
        text = self._out.decode(data)
        if text:
            self._hub.publish(self._session, "o", text)

    def on_resize(self, size: TermSize) -> None:
        self._hub.publish(self._session, "r", f"{size.cols}x{size.rows}")

    def close(self) -> None:
        self._hub.close(self._session)
