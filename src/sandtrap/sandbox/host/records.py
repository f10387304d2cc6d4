"""A box's state record on disk (one JSON file in its directory), shared by the backends that keep one (microvm,
nspawn): written atomically, read back tolerating unknown or missing keys (a record of another version)."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, fields
from datetime import datetime
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R")


def save(path: Path, record: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(record), indent=1) + "\n")
    os.replace(tmp, path)


def load(path: Path, cls: type[R]) -> R | None:
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict):
        return None
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in raw.items() if k in known})
    except TypeError:
        return None


def when(text: str) -> datetime | None:
    try:
        return datetime.fromisoformat(text) if text else None
    except ValueError:
        return None
