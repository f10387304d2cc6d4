"""A throw-away PostgreSQL cluster of the test's own, to stop and start under a running honeypot.

Needs root (``pg_ctl`` runs as user ``postgres``) and Debian's postgresql server package; skips otherwise.
Used by tests/integration/test_faults.py and test_fleet.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sshclient import free_port

IS_ROOT = os.geteuid() == 0


class PrivatePostgres:
    """A throw-away PostgreSQL cluster of our own (initdb, pg_ctl as user postgres) on a free loopback port."""

    def __init__(self) -> None:
        bins = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
        if not bins or not IS_ROOT or not shutil.which("runuser"):
            pytest.skip("a private PostgreSQL needs root and the postgresql server package")
        self.bin = bins[-1].parent
        self.dir = Path(tempfile.mkdtemp(prefix="sandtrap-pg-", dir="/var/tmp"))
        shutil.chown(self.dir, "postgres")
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True, timeout=120)

    def init(self) -> None:
        self._pg(str(self.bin / "initdb"), "-D", str(self.dir / "data"), "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._pg(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.dir / "data"),
            "-l",
            str(self.dir / "log"),
            "-o",
            opts,
            "-w",
            "start",
        )

    def stop(self) -> None:
        self._pg(str(self.bin / "pg_ctl"), "-D", str(self.dir / "data"), "-m", "fast", "-w", "stop")

    def is_running(self) -> bool:
        return (self.dir / "data" / "postmaster.pid").exists()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


@contextlib.contextmanager
def running_cluster() -> Iterator[PrivatePostgres]:
    """A started cluster, stopped (if it still runs) and removed afterwards, whatever happened."""
    pg = PrivatePostgres()
    try:
        pg.init()
        pg.start()
        yield pg
    finally:
        with contextlib.suppress(subprocess.SubprocessError):
            if pg.is_running():
                pg.stop()
        pg.remove()
