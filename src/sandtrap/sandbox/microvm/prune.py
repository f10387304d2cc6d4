"""What the micro-VM backend deletes of its own files: templates that are no longer current and images of the
cache not used for a while (each ~1.1 GiB; a template ~0.3 GiB), never what a kept VM's overlay (a preserved
VM's, kept for forensics) or a kept template sits on.

Called when a new template was saved (a new image or QEMU command line: what was current before is stale now),
under the templates' lock. Another process may use what this one does not (the image cache may be shared by other
sensors, whose VMs this one cannot see; another config on the same data directory has templates of its own, as
the tests have): a template or image is deleted only when its ``used`` stamp (touched at each use, at most
hourly) is older than :data:`KEEP_UNUSED_S`.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
import time
from pathlib import Path

log = logging.getLogger(__name__)

KEEP_UNUSED_S = 7 * 86400
STAMP = "used"
STAMP_EVERY_S = 3600.0
QCOW2_MAGIC = b"QFI\xfb"
MAX_NAME = 1023  # the qcow2 format's limit on a backing file name
MAX_DEPTH = 8
IMAGE_PREFIX = "microvm-"
TEMPLATE_PREFIX = "snapshot-"


def backing_file(disk: Path) -> Path | None:
    """The backing file a qcow2 header names (resolved against the overlay's directory), or None."""
    try:
        with disk.open("rb") as f:
            head = f.read(20)
            if len(head) < 20 or head[:4] != QCOW2_MAGIC:
                return None
            offset, size = struct.unpack(">QI", head[8:20])
            if not offset or not 0 < size <= MAX_NAME:
                return None
            f.seek(offset)
            name = f.read(size).decode("utf-8", "surrogateescape")
    except OSError:
        return None
    return Path(os.path.normpath(disk.parent / name))


def chain(disk: Path) -> set[Path]:
    """Every file below ``disk`` in its backing chain (bounded: a loop or a deep chain stops)."""
    out: set[Path] = set()
    current: Path | None = disk
    for _ in range(MAX_DEPTH):
        current = backing_file(current) if current is not None else None
        if current is None or current in out:
            break
        out.add(current)
    return out


def in_use(*disks_under: Path) -> set[Path]:
    """What the overlays ``<dir>/*/disk.qcow2`` of these directories (VMs, templates) sit on."""
    used: set[Path] = set()
    for root in disks_under:
        for disk in root.glob("*/disk.qcow2"):
            used |= chain(disk)
    return used


def mark_used(directory: Path) -> None:
    """Touch ``directory``'s stamp (at most every :data:`STAMP_EVERY_S`); harmless where it cannot be written."""
    stamp = directory / STAMP
    try:
        if time.time() - stamp.stat().st_mtime < STAMP_EVERY_S:
            return
    except OSError:
        pass
    try:
        stamp.touch()
    except OSError as exc:
        log.debug("cannot stamp %s as used: %s", directory, exc)


def last_used(directory: Path) -> float:
    """When it was last used: its stamp, else when it was made (its manifest)."""
    for name in (STAMP, "manifest.json"):
        try:
            return (directory / name).stat().st_mtime
        except OSError:
            continue
    return 0.0


def after_new_template(template: Path, image: Path, vms: Path, cache_dir: Path, now: float | None = None) -> list[Path]:
    """Delete the templates beside ``template``, then the images of ``cache_dir`` other than ``image``, that no VM
    of this sensor sits on and nothing used for :data:`KEEP_UNUSED_S`."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    used = in_use(vms)
    for other in sorted(template.parent.glob(f"{TEMPLATE_PREFIX}*")):
        if other == template or not other.is_dir() or (other / "disk.qcow2") in used:
            continue
        if now - last_used(other) > KEEP_UNUSED_S:
            removed.append(other)
    for directory in removed:
        shutil.rmtree(directory, ignore_errors=True)
    used |= in_use(template.parent)
    images = []
    for other in sorted(Path(cache_dir).glob(f"{IMAGE_PREFIX}*")):
        if other == image or not other.is_dir() or other.name.endswith(".tmp"):  # .tmp: a build under way
            continue
        if (other / "disk.qcow2") not in used and now - last_used(other) > KEEP_UNUSED_S:
            images.append(other)
    for directory in images:
        shutil.rmtree(directory, ignore_errors=True)
    for directory in removed + images:
        log.info("pruned %s (no longer current, and no kept VM sits on it)", directory)
    return removed + images
