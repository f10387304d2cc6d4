"""Pruning the micro-VM backend's templates and images (sandbox/microvm/prune.py), on qcow2 chains made by
qemu-img: nothing a kept VM's overlay sits on is deleted, and an image another sensor used lately stays."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from sandtrap.sandbox.microvm import prune

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="apt-get install qemu-utils")
DAY = 86400.0


def _qcow2(path: Path, backing: Path | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing is not None:
        argv += ["-F", "qcow2", "-b", str(backing)]
    subprocess.run([*argv, str(path), "16M"], check=True)
    return path


def _image(cache: Path, name: str, age_days: float) -> Path:
    directory = cache / name
    _qcow2(directory / "disk.qcow2")
    (directory / "manifest.json").write_text("{}")
    stamp = directory / prune.STAMP
    stamp.touch()
    then = time.time() - age_days * DAY
    os.utime(stamp, (then, then))
    return directory


def test_the_backing_chain_is_read_from_the_headers(tmp_path: Path) -> None:
    base = _qcow2(tmp_path / "img" / "disk.qcow2")
    middle = _qcow2(tmp_path / "tpl" / "disk.qcow2", base)
    top = _qcow2(tmp_path / "vm" / "disk.qcow2", middle)
    assert prune.backing_file(top) == middle
    assert prune.chain(top) == {middle, base}
    assert prune.chain(base) == set()
    (tmp_path / "junk").write_bytes(b"QFI\xfb" + b"\xff" * 40)  # a header naming a name past the file's end
    assert prune.backing_file(tmp_path / "junk") is None
    assert prune.backing_file(tmp_path / "missing") is None


def test_unused_templates_and_images_go_and_what_a_kept_vm_sits_on_stays(tmp_path: Path) -> None:
    cache, vms, templates = tmp_path / "cache", tmp_path / "vms", tmp_path / "templates"
    current = _image(cache, "microvm-current", age_days=30)
    old = _image(cache, "microvm-old", age_days=30)
    kept_by_vm = _image(cache, "microvm-forensics", age_days=30)
    other_sensors = _image(cache, "microvm-neighbour", age_days=1)
    building = cache / "microvm-build-x.tmp"
    building.mkdir()
    new_template = templates / "snapshot-new"
    _qcow2(new_template / "disk.qcow2", current / "disk.qcow2")
    stale = templates / "snapshot-stale"
    _qcow2(stale / "disk.qcow2", old / "disk.qcow2")
    sat_on = templates / "snapshot-preserved"
    _qcow2(sat_on / "disk.qcow2", kept_by_vm / "disk.qcow2")
    _qcow2(vms / "a1" / "disk.qcow2", sat_on / "disk.qcow2")  # a preserved VM restored from an old template
    other_config = templates / "snapshot-other-config"  # another config on this data dir uses it (the tests do)
    _qcow2(other_config / "disk.qcow2", current / "disk.qcow2")
    prune.mark_used(other_config)

    removed = prune.after_new_template(new_template, current, vms, cache)

    assert sorted(p.name for p in removed) == ["microvm-old", "snapshot-stale"]
    assert not stale.exists() and not old.exists()
    for kept in (new_template, sat_on, other_config, current, kept_by_vm, other_sensors, building):
        assert kept.exists(), kept


def test_the_used_stamp_is_touched_at_most_hourly(tmp_path: Path) -> None:
    prune.mark_used(tmp_path)
    first = (tmp_path / prune.STAMP).stat().st_mtime
    os.utime(tmp_path / prune.STAMP, (first - 60, first - 60))
    prune.mark_used(tmp_path)
    assert (tmp_path / prune.STAMP).stat().st_mtime == first - 60  # within the hour: left alone
    os.utime(tmp_path / prune.STAMP, (first - 7200, first - 7200))
    prune.mark_used(tmp_path)
    assert (tmp_path / prune.STAMP).stat().st_mtime > first - 60
