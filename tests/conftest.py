"""Shared test set-up: every test gets its own data dir; integration tests get a unique sensor name."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Test helper modules (helpers, fakes, sshd, conftest_image) import by name from these folders.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))

# Fixtures on the real engine (sandbox backends, the image, a running honeypot) for every folder.
pytest_plugins = ["sandtrap_fixtures"]

# Test artefacts (screenshots, logs) go here; CI keeps it with the run.
OUTPUT_DIR = ROOT / "test-output"


@pytest.fixture
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDTRAP_CONFIG", raising=False)


def pytest_report_header() -> str:
    return f"sandtrap tests: output in {OUTPUT_DIR}, docker host {os.environ.get('DOCKER_HOST', 'local socket')}"
