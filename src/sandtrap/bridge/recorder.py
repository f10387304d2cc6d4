"""Record one channel as an asciinema v2 cast, with the raw keystrokes kept beside it.

The cast is a header line, then one JSON array per event: ``[t, "o", text]`` for what the box wrote
(stdout and stderr alike), ``[t, "i", text]`` for what the attacker sent, ``[t, "r", "COLSxROWS"]``
for a window change and one ``[t, "m", "output truncated"]`` marker where output stops being
recorded (``max_bytes``). ``t`` is seconds since the recorder started. Bytes are decoded as UTF-8
incrementally, one decoder per stream, so a character split across chunks stays whole and invalid
bytes become U+FFFD; the input exactly as received goes to ``<cast>.input.raw``.

Lines go to a buffered file that is flushed ``flush_interval_s`` after the first unflushed write
(a timer on the running loop, armed again by the next write) and on close, so a SIGKILL loses at
most that interval. A file error (disk full, no permission) is counted in ``errors`` and ends the
recording; the relay never sees it. With a :class:`~sandtrap.outputs.recording.RecordingHealth` the
error is reported there (rate-limited, counted per output) instead of logged here, and a cast closed
without error tells it that casts are written again.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from sandtrap.outputs.recording import CASTS, RecordingHealth
from sandtrap.sandbox.base import TermSize

log = logging.getLogger(__name__)

_BUFFER_BYTES = 256 * 1024  # larger than a flush interval's output in practice: the timer decides
TRUNCATED = "output truncated"
INPUT_TRUNCATED = "input truncated"


class CastSummary(NamedTuple):
    """What ``cowrie.log.closed`` reports: the cast's path, size, SHA-256 and length in seconds."""

    path: Path
    size: int
    sha256: str
    duration_s: float


def raw_input_path(cast: Path) -> Path:
    return cast.with_name(cast.name + ".input.raw")


def _decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


class CastRecorder:
    """A :class:`~sandtrap.bridge.proxy.RelayObserver` writing one channel's cast."""

    def __init__(
        self,
        path: Path,
        width: int,
        height: int,
        term: str,
        shell: str,
        title: str,
        flush_interval_s: float,
        max_bytes: int,
        clock: Callable[[], float] = time.monotonic,
        health: RecordingHealth | None = None,
    ) -> None:
        self.path = path
        self._health = health
        self.raw_path = raw_input_path(path)
        self.errors = 0
        self.bytes_out = 0  # everything the box wrote, recorded or not
        self.bytes_in = 0
        self.is_truncated = False
        self._flush_interval_s = flush_interval_s
        self._max_bytes = max_bytes
        self._clock = clock
        self._start = clock()
        self._last_t = 0.0
        self._out = _decoder()
        self._err = _decoder()
        self._in = _decoder()
        self._sha = hashlib.sha256()
        self._size = 0
        self._file: BinaryIO | None = None
        self._raw: BinaryIO | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._summary: CastSummary | None = None
        header = {
            "version": 2,
            "width": width,
            "height": height,
            "timestamp": int(time.time()),
            "env": {"TERM": term, "SHELL": shell},
            "title": title,
        }
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(path, "wb", buffering=_BUFFER_BYTES)
            # ASCII-only: the header carries client-chosen strings (TERM) that may hold anything.
            self._line(json.dumps(header, ensure_ascii=True))
            self._file.flush()  # a cast that is killed at once still opens
        except OSError as exc:
            self._fail(exc)

    @property
    def is_recording(self) -> bool:
        return self._file is not None

    # -- RelayObserver ---------------------------------------------------------------------------
    def on_output(self, data: bytes, stderr: bool) -> None:
        room = self._max_bytes - self.bytes_out
        self.bytes_out += len(data)
        if self._file is None or self.is_truncated:
            return
        if len(data) > room:
            data = data[: max(room, 0)]
            self.is_truncated = True
        text = (self._err if stderr else self._out).decode(data)
        if text:
            self._event("o", text)
        if self.is_truncated:
            self._event("m", TRUNCATED)

    def on_input(self, data: bytes) -> None:
        room = self._max_bytes - self.bytes_in
        self.bytes_in += len(data)
        if self._file is None or room <= 0:
            return
        cut = len(data) > room
        data = data[:room]
        try:
            if self._raw is None:
                self._raw = open(self.raw_path, "wb", buffering=_BUFFER_BYTES)
            self._raw.write(data)
        except OSError as exc:
            self._fail(exc)
            return
        self._arm_flush()
        text = self._in.decode(data)
        if text:
            self._event("i", text)
        if cut:
            self._event("m", INPUT_TRUNCATED)

    def on_resize(self, size: TermSize) -> None:
        self._event("r", f"{size.cols}x{size.rows}")

    # -- closing ---------------------------------------------------------------------------------
    def close(self) -> CastSummary:
        """Flush and close (a second call returns the same summary)."""
        if self._summary is not None:
            return self._summary
        duration = round(max(self._clock() - self._start, 0.0), 6)
        if self._file is not None:
            # A character cut off by the end of the stream is written as U+FFFD.
            tail_out = self._out.decode(b"", final=True) if not self.is_truncated else ""
            tail_err = self._err.decode(b"", final=True) if not self.is_truncated else ""
            tail_in = self._in.decode(b"", final=True)
            for kind, tail in (("o", tail_out), ("o", tail_err), ("i", tail_in)):
                if tail:
                    self._event(kind, tail)
        self._cancel_timer()
        for f in (self._file, self._raw):
            if f is None:
                continue
            try:
                f.close()
            except OSError as exc:
                self._fail(exc)
        self._file = self._raw = None
        size, digest = self._size, self._sha.hexdigest()
        if self.errors:
            size, digest = _measure(self.path)  # what actually reached the disk
        elif self._health is not None:
            self._health.succeeded(CASTS)
        self._summary = CastSummary(self.path, size, digest, duration)
        return self._summary

    # -- writing ---------------------------------------------------------------------------------
    def _event(self, kind: str, text: str) -> None:
        if self._file is None:
            return
        t = max(self._clock() - self._start, self._last_t)
        self._last_t = t
        try:
            self._line(json.dumps([round(t, 6), kind, text], ensure_ascii=False))
        except OSError as exc:
            self._fail(exc)
            return
        self._arm_flush()

    def _line(self, line: str) -> None:
        assert self._file is not None
        raw = line.encode("utf-8") + b"\n"
        self._file.write(raw)
        self._sha.update(raw)
        self._size += len(raw)

    def _arm_flush(self) -> None:
        if self._timer is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no loop (a synchronous caller): flushed when the buffer fills and on close
        self._timer = loop.call_later(self._flush_interval_s, self._flush)

    def _flush(self) -> None:
        self._timer = None
        try:
            for f in (self._file, self._raw):
                if f is not None:
                    f.flush()
        except OSError as exc:
            self._fail(exc)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _fail(self, exc: OSError) -> None:
        self.errors += 1
        if self._health is not None:
            self._health.failed(CASTS, exc)
        else:
            log.warning("cast %s: recording stopped: %s", self.path, exc)
        self._cancel_timer()
        for f in (self._file, self._raw):
            if f is not None:
                with contextlib.suppress(OSError):
                    f.close()
        self._file = self._raw = None


def _measure(path: Path) -> tuple[int, str]:
    sha = hashlib.sha256()
    size = 0
    try:
        if not path.is_file():  # nothing was created, or a device such as /dev/full
            return size, sha.hexdigest()
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                sha.update(block)
                size += len(block)
    except OSError:
        pass
    return size, sha.hexdigest()
