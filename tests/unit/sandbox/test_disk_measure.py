"""The disk watch's measure of a writable layer: allocated bytes, entries, a bound on the walk."""

from __future__ import annotations

import os
from pathlib import Path

from sandtrap.sandbox.docker.disk import measure


def test_measure_counts_allocated_bytes_and_entries_and_stops_at_the_bound(tmp_path: Path) -> None:
    (tmp_path / "root" / ".cache").mkdir(parents=True)
    (tmp_path / "root" / "big").write_bytes(b"\1" * (3 * 1024 * 1024))
    with open(tmp_path / "root" / "sparse", "wb") as f:  # a hole costs no disk
        f.truncate(1 << 30)
    os.symlink("/nonexistent/elsewhere", tmp_path / "root" / "link")  # not followed
    for i in range(50):
        (tmp_path / "root" / ".cache" / f"f{i}").write_bytes(b"x")
    usage = measure(str(tmp_path), 10_000)
    assert usage is not None and not usage.cut
    assert usage.files == 1 + 4 + 50  # root; .cache, big, sparse, link; the 50 files
    assert 3 * 1024 * 1024 <= usage.bytes < 4 * 1024 * 1024 + 60 * 8192
    cut = measure(str(tmp_path), 20)
    assert cut is not None and cut.cut and cut.files == 21
    assert measure(str(tmp_path / "gone"), 10) is None
