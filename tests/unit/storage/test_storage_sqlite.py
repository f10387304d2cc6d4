"""The storage suite (storage_suite.py) on SQLite in a temporary directory."""

from __future__ import annotations

from storage_suite import *  # noqa: F403  (the suite's tests and fixtures, collected here)
