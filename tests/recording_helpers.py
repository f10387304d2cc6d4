"""Helpers for the recording tests: a throw-away PostgreSQL database, and screen text out of terminal output.

PostgreSQL comes as in ``tests/integration/test_storage.py``: ``SANDTRAP_TEST_PG_URL``, else the URL that
``scripts/postgres.sh`` prints (it installs and starts a local cluster when needed).
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import create_engine
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import OperationalError, ProgrammingError
from sqlalchemy.pool import NullPool

from sandtrap.storage.engine import normalize_url

ROOT = Path(__file__).resolve().parent.parent


@functools.cache
def postgres_base_url() -> URL:
    """The test server's URL (once per test run); AssertionError with the script's output when there is none."""
    url = os.environ.get("SANDTRAP_TEST_PG_URL", "")
    if not url:
        proc = subprocess.run(
            ["bash", str(ROOT / "scripts" / "postgres.sh")], capture_output=True, text=True, timeout=900, check=False
        )
        assert proc.returncode == 0 and proc.stdout.strip(), (
            f"scripts/postgres.sh failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
        url = proc.stdout.strip().splitlines()[-1]
    return normalize_url(url)


@contextlib.contextmanager
def fresh_database(base: URL) -> Iterator[str]:
    """A uniquely named database on the server of ``base``, dropped (connections and all) afterwards."""
    name = f"sandtrap_t_{secrets.token_hex(6)}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
        try:
            yield base.set(database=name).render_as_string(hide_password=False)
        finally:
            _drop(admin, name)
    finally:
        admin.dispose()


def _drop(admin: Engine, name: str) -> None:
    """DROP ... WITH (FORCE) ends our role's connections, but not an autovacuum worker's (a superuser's process:
    "must be a member of the role whose process is being terminated") busy on a database just written to; it
    is done within seconds, so the drop is tried again for up to 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with admin.connect() as conn:
                conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            return
        except (ProgrammingError, OperationalError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


# A CSI sequence (ESC [ params final), an OSC/DCS/APC/PM string, or a two-character escape.
_ESCAPE = re.compile(r"\x1b\[([0-?]*)[ -/]*([@-~])|\x1b[\]P_^][^\x07\x1b]*(?:\x07|\x1b\\)?|\x1b[@-Z\\-_]")


def screen_lines(text: str) -> list[str]:
    """What a terminal shows for ``text``, line by line, for line-oriented output such as a shell's.

    Enough of a terminal for a prompt and line editing: ``\\r`` returns to column 0, ``\\b`` moves
    left, printable characters overwrite, ``ESC [ K`` erases to the end of the line, ``\\n`` starts
    the next line; every other escape sequence is dropped. Trailing blanks are stripped.
    """
    lines: list[str] = []
    for raw in text.split("\n"):
        cells: list[str] = []
        col = 0
        pos = 0
        while pos < len(raw):
            m = _ESCAPE.match(raw, pos)
            if m:
                if m.group(2) == "K" and m.group(1) in ("", "0"):
                    del cells[col:]
                pos = m.end()
                continue
            ch = raw[pos]
            pos += 1
            if ch == "\r":
                col = 0
            elif ch == "\b":
                col = max(0, col - 1)
            elif ch.isprintable():
                cells.extend(" " * (col + 1 - len(cells)))
                cells[col] = ch
                col += 1
        lines.append("".join(cells).rstrip())
    return lines
