"""A cast written by CastRecorder replays in the real asciinema 2.x player (no SSH server involved)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sandtrap.bridge.recorder import CastRecorder
from sandtrap.sandbox.base import TermSize

ASCIINEMA = Path(sys.executable).parent / "asciinema"

PROMPT = b"\x1b]0;root@web01: ~\x07\x1b[01;32mroot@web01\x1b[00m:\x1b[01;34m~\x1b[00m# "
SNOWMAN = "☃".encode()


class StepClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


def record(path: Path) -> None:
    rec = CastRecorder(
        path,
        width=80,
        height=24,
        term="xterm-256color",
        shell="/bin/bash",
        title="4f2a9c from 198.51.100.23 (channel 0)",
        flush_interval_s=0.5,
        max_bytes=1 << 20,
        clock=StepClock(),
    )
    rec.on_output(b"Linux web01 6.1.0-18-amd64 #1 SMP x86_64\r\n", False)
    rec.on_output(PROMPT, False)
    for key in (b"l", b"s", b" ", b"-", b"-", b"c", b"o", b"l", b"o", b"r", b"\r"):
        rec.on_input(key)
        rec.on_output(key if key != b"\r" else b"\r\n", False)
    rec.on_output(b"\x1b[0m\x1b[01;34mbin\x1b[0m  notes-" + SNOWMAN[:2], False)  # a character split in two
    rec.on_output(SNOWMAN[2:] + b".txt\r\n", False)
    rec.on_resize(TermSize(132, 43))
    rec.on_output(PROMPT, False)
    rec.on_input(b"exit\r")
    rec.on_output(b"exit\r\nlogout\r\n", False)
    summary = rec.close()
    assert summary.size == path.stat().st_size
    assert rec.errors == 0


def run_asciinema(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run the installed asciinema; stdout is decoded as UTF-8 with its \\r\\n left alone."""
    assert ASCIINEMA.exists(), f"{ASCIINEMA} missing: install the dev extras (pip install -e '.[dev]')"
    env = {**os.environ, "ASCIINEMA_CONFIG_HOME": str(tmp_path / "asciinema-config"), "LANG": "C.UTF-8"}
    done = subprocess.run(
        [str(ASCIINEMA), *args],
        capture_output=True,
        env=env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,  # no controlling terminal: asciinema must not put ours in raw mode
        timeout=60,
        check=False,
    )
    return subprocess.CompletedProcess(
        done.args, done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8", "replace")
    )


@pytest.fixture
def cast(tmp_path: Path) -> Path:
    path = tmp_path / "casts" / "4f2a9c" / "0.cast"
    record(path)
    return path


def test_asciinema_cat_prints_the_output(cast: Path, tmp_path: Path) -> None:
    done = run_asciinema(["cat", str(cast)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Linux web01" in done.stdout
    assert "\x1b[01;34mbin\x1b[0m  notes-☃.txt\r\n" in done.stdout
    assert "logout" in done.stdout
    assert "ls --color" in done.stdout  # the shell's echo of what was typed


def test_asciinema_play_reads_every_event(cast: Path, tmp_path: Path) -> None:
    done = run_asciinema(["play", "-s", "100", "--out-fmt", "asciicast", str(cast)], tmp_path)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines() if line]
    header, events = lines[0], lines[1:]
    assert header["title"] == "4f2a9c from 198.51.100.23 (channel 0)"
    assert {e[1] for e in events} == {"o", "i", "r"}
    assert ["r", "132x43"] in [e[1:] for e in events]
    assert "".join(e[2] for e in events if e[1] == "i") == "ls --color\rexit\r"

    raw = run_asciinema(["play", "-s", "100", str(cast)], tmp_path)
    assert raw.returncode == 0, raw.stderr
    assert "notes-☃.txt" in raw.stdout


def test_asciinema_accepts_the_truncation_marker(tmp_path: Path) -> None:
    path = tmp_path / "big.cast"
    rec = CastRecorder(path, 80, 24, "xterm", "/bin/sh", "t", 0.5, max_bytes=100, clock=StepClock())
    for _ in range(10):
        rec.on_output(b"A" * 30 + b"\r\n", False)
    rec.close()
    assert '"m", "output truncated"' in path.read_text()
    done = run_asciinema(["play", "-s", "100", "--out-fmt", "asciicast", str(path)], tmp_path)
    assert done.returncode == 0, done.stderr
    assert ["m", "output truncated"] in [json.loads(line)[1:] for line in done.stdout.splitlines()[1:]]
    cat = run_asciinema(["cat", str(path)], tmp_path)
    assert cat.returncode == 0, cat.stderr
    assert cat.stdout.count("A") == 100 - 2 * 3  # three full lines and their \r\n: 96 bytes, then 4 As
