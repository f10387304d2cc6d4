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
