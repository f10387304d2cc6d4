"""Shared test set-up: every test gets its own data dir; integration tests get a unique sensor name."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Test helper modules (helpers, fakes, sshd, conftest_image, battery) import by name from these folders.
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent / "integration"))
sys.path.insert(0, str(Path(__file__).resolve().parent / "realism"))

# Fixtures on the real engine (sandbox backends, the image, a running honeypot) for every folder.
pytest_plugins = ["sandtrap_fixtures"]

# Test artefacts (screenshots, logs) go here; CI keeps it with the run.
OUTPUT_DIR = ROOT / "test-output"
if os.environ.get("SANDTRAP_TEST_BACKEND", "docker") != "docker":  # make test's nspawn pass: beside Docker's
    OUTPUT_DIR = OUTPUT_DIR / os.environ["SANDTRAP_TEST_BACKEND"]


@pytest.fixture
def output_dir() -> Path:
    OUTPUT_DIR.mkdir(exist_ok=True)
    return OUTPUT_DIR


@pytest.fixture(autouse=True)
def _no_user_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SANDTRAP_CONFIG", raising=False)


def pytest_report_header() -> str:
    return f"sandtrap tests: output in {OUTPUT_DIR}, docker host {os.environ.get('DOCKER_HOST', 'local socket')}"


# Figures the battery tests print ("[load] ...", "[fuzz] ...", "[faults] ..."): pytest keeps a passing test's
# output to itself, so they are gathered here and shown at the end of the run (and in test-output/figures.txt).
FIGURE_PREFIXES = ("[load]", "[fuzz]", "[faults]", "[escape]", "[microvm]")
_figures: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when != "call":
        return
    for line in report.capstdout.splitlines():
        if line.lstrip().startswith(FIGURE_PREFIXES):
            _figures.append(line.strip())


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _figures:
        return
    terminalreporter.section("figures (SECURITY.md quotes them)")
    for line in _figures:
        terminalreporter.write_line(line)
    OUTPUT_DIR.mkdir(exist_ok=True)
    # make test's micro-VM lane runs beside the main pass (scripts/test.sh): a file of its own
    lane = os.environ.get("SANDTRAP_TEST_LANE", "")
    name = f"figures-{lane}.txt" if lane else "figures.txt"
    (OUTPUT_DIR / name).write_text("\n".join(_figures) + "\n", encoding="utf-8")
