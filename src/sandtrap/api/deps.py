"""What the API and the web UI need from the rest of sandtrap, as one small object.

``sandtrap run`` fills every field from its running services; ``sandtrap api`` (a console against
the same storage, no honeypot in the process) leaves the live parts empty.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from sandtrap.bridge.live import LiveHub
from sandtrap.config import Settings
from sandtrap.storage.repository import Repository


@dataclass
class ApiDeps:
    settings: Settings
    repository: Repository
    # Live parts: None when the API runs without the honeypot (sandtrap api).
    live: LiveHub | None = None
    pool_stats: Callable[[], dict[str, int]] | None = None
    engine_ping: Callable[[], Awaitable[None]] | None = None
    storage_status: Callable[[], dict[str, Any]] | None = None
    # RecordingHealth.status: write failures per output, the data dir's free bytes.
    recording_status: Callable[[], dict[str, Any]] | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    # What /metrics exposes (the MetricsSink's registry); None: /metrics answers 404.
    metrics: CollectorRegistry | None = None
    # AlertSink.status: per rule and target, alerts sent, failed, dropped, retried.
    alerts_status: Callable[[], dict[str, Any]] | None = None

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir
