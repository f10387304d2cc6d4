"""Diagnostics for operators: one line per record, UTC time, logger, message, bound session context.

The session (and source address) of the connection being served is bound in a context variable by
the SSH front end, so every record emitted while serving it names it without passing it around.
"""

from __future__ import annotations

import contextvars
import logging
import sys
import time

session_context: contextvars.ContextVar[str] = contextvars.ContextVar("sandtrap_session", default="")


class ContextFormatter(logging.Formatter):
    converter = staticmethod(time.gmtime)

    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s %(context)s%(message)s", "%Y-%m-%dT%H:%M:%S"
        )

    def format(self, record: logging.LogRecord) -> str:
        ctx = session_context.get()
        record.context = f"[{ctx}] " if ctx else ""
        return super().format(record)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(ContextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("asyncssh", "aiohttp", "asyncio"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class RateLimited:
    """Log a kind of message at most once per ``interval_s`` (first one at once), counting the rest.

    A flood of hostile connections must not fill the disk with diagnostics: refusals are logged
    through this, with how many were suppressed since the last line.
    """

    def __init__(self, logger: logging.Logger, interval_s: float = 60.0, max_keys: int = 1000) -> None:
        self._logger = logger
        self._interval = interval_s
        self._max_keys = max_keys
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self._interval:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if last is None and len(self._last) >= self._max_keys:
            self._last.clear()
            self._suppressed.clear()
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            self._logger.log(level, msg + " (%d more like this suppressed)", *args, skipped)
        else:
            self._logger.log(level, msg, *args)
