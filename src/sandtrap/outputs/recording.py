"""Whether recording works: write failures of every output that writes to the data dir, and its free space.

The outputs (the JSON log's writer thread, each channel's cast, the artifact store; the database sink
keeps its own counters and is read through ``database_status``) report each failed write with
:meth:`RecordingHealth.failed` and a later good one with :meth:`RecordingHealth.succeeded`. An output
is *failing* from a failed write until its next good one. ``/api/v1/status`` (``recording``) and
``/metrics`` (``sandtrap_recording_errors_total``, ``sandtrap_recording_ok``,
``sandtrap_data_free_bytes``) read :meth:`RecordingHealth.status`.

Diagnostics are rate-limited per output: one line when an output starts failing (then at most one a
minute while it goes on failing, with how many were suppressed) and one when it writes again. A full
disk under a flood of sessions writes a handful of lines, not one per event or per cast.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from sandtrap.logs import RateLimited

log = logging.getLogger(__name__)

JSONLOG = "jsonlog"
CASTS = "casts"
ARTIFACTS = "artifacts"
DATABASE = "database"
OUTPUTS = (JSONLOG, CASTS, ARTIFACTS, DATABASE)
NAMES = {JSONLOG: "json log", CASTS: "casts", ARTIFACTS: "artifacts", DATABASE: "database"}
# Below this many free bytes the data dir counts as (nearly) full: recording is not ok.
LOW_SPACE_BYTES = 16 * 2**20
LOG_INTERVAL_S = 60.0


class RecordingHealth:
    """Thread-safe: outputs report from the event loop, the JSON log's thread and worker threads."""

    def __init__(
        self,
        data_dir: Path,
        database_status: Callable[[], Mapping[str, Any]] | None = None,
        low_space_bytes: int = LOW_SPACE_BYTES,
        log_interval_s: float = LOG_INTERVAL_S,
    ) -> None:
        self.data_dir = data_dir
        self.database_status = database_status
        self._low_space = low_space_bytes
        self._lock = threading.Lock()
        self._errors = dict.fromkeys(OUTPUTS, 0)
        self._failing: dict[str, str] = {}  # output -> its latest error, while failing
        self._limited = RateLimited(log, log_interval_s)

    def failed(self, output: str, exc: BaseException | str) -> None:
        """One failed write (or a recording that stopped) of ``output``."""
        message = _describe(exc)
        with self._lock:
            self._errors[output] = self._errors.get(output, 0) + 1
            self._failing[output] = message
            count = self._errors[output]
        free = self.free_bytes()
        self._limited.log(
            logging.ERROR,
            f"failed:{output}",
            "recording to the %s failed (%d failures so far): %s; %s bytes free in %s",
            NAMES.get(output, output),
            count,
            message,
            "unknown" if free is None else free,
            self.data_dir,
        )

    def succeeded(self, output: str) -> None:
        """A good write of ``output``: cheap when it was not failing (called for every JSON log line)."""
        if output not in self._failing:
            return
        with self._lock:
            if self._failing.pop(output, None) is None:
                return
            count = self._errors.get(output, 0)
        self._limited.log(
            logging.WARNING,
            f"ok:{output}",
            "recording to the %s works again (%d failures in all)",
            NAMES.get(output, output),
            count,
        )

    def free_bytes(self) -> int | None:
        """Bytes an unprivileged writer can still use on the data dir's filesystem (None: unknown)."""
        try:
            st = os.statvfs(self.data_dir)
        except OSError:
            return None
        return st.f_bavail * st.f_frsize

    def status(self) -> dict[str, Any]:
        with self._lock:
            errors = dict(self._errors)
            failing = dict(self._failing)
        if self.database_status is not None:
            db = self.database_status()
            errors[DATABASE] = _int(db.get("errors")) + _int(db.get("rejected"))
            if db.get("is_down"):
                failing[DATABASE] = str(db.get("last_error") or "unavailable")
        free = self.free_bytes()
        low_space = free is not None and free < self._low_space
        problems = [f"{NAMES.get(k, k)}: {v}" for k, v in sorted(failing.items())]
        if low_space:
            problems.append(f"data dir nearly full: {free} bytes free")
        return {
            "ok": not problems,
            "error": "; ".join(problems)[:600] or None,
            "errors": errors,
            "failing": sorted(failing),
            "free_bytes": free,
            "low_space": low_space,
        }


def _describe(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return exc[:300]
    if isinstance(exc, OSError) and exc.strerror:
        # Without the file name: the path is in the line's context, and it may be attacker-chosen.
        return f"[Errno {exc.errno}] {exc.strerror}"
    return (str(exc) or type(exc).__name__)[:300]


def _int(value: Any) -> int:
    try:
        return max(int(value), 0)
    except (TypeError, ValueError):
        return 0
