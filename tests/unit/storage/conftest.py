"""Storage unit tests: the shared suite (storage_suite.py) on SQLite in a temporary directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# storage_suite.py is imported by name here and by tests/integration/test_storage.py.
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'db' / 'sandtrap.db'}"
