"""The pool's ledger: one JSON file per sandbox with what the engine's labels cannot hold (session, source IP,
acquired and released times), written atomically so a SIGKILL leaves whole files."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict
from datetime import datetime
from pathlib import Path
from typing import Any

from sandtrap.logs import RateLimited
from sandtrap.sandbox.base import SandboxInfo

log = logging.getLogger(__name__)
ledger_errors = RateLimited(log)


class Ledger:
    """Per-sandbox JSON records, written atomically so a SIGKILL leaves whole files."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._dir.mkdir(parents=True, exist_ok=True)

    def _path(self, sandbox_id: str) -> Path:
        return self._dir / f"{sandbox_id[:64]}.json"

    def write(self, info: SandboxInfo) -> None:
        data = asdict(info)
        for key in ("created", "acquired", "released"):
            if data[key] is not None:
                data[key] = data[key].isoformat()
        path = self._path(info.id)
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(data), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as exc:  # best effort (a full disk): the engine's labels and names still tell
            ledger_errors.log(logging.WARNING, "ledger", "sandbox ledger not written: %s", exc)

    def read(self, sandbox_id: str) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads(self._path(sandbox_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data

    def delete(self, sandbox_id: str) -> None:
        self._path(sandbox_id).unlink(missing_ok=True)


def when(value: Any) -> datetime | None:
    if isinstance(value, str) and value:
        try:
            return datetime.fromisoformat(value)
        except ValueError:
            return None
    return None
