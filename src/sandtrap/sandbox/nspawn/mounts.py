"""A box's file system on the host: a size-limited tmpfs for what it writes, an overlay over the image's tree.

The overlay's lower layers are the box's ``seed`` (hostname, hosts, planted files) over the image's tree; its
upper and work directories sit on a tmpfs of ``sandbox.nspawn.disk_size`` (the disk bound: a full upper is
ENOSPC in the box, never a full host disk). Both stay mounted after the box stops (its changes are read there
for forensics) and go when the box is removed.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[,:\s\\]")


class MountError(OSError):
    """A box's tmpfs or overlay could not be mounted or unmounted."""


def mount_points() -> list[str]:
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        return [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def _run(argv: list[str], cwd: Path | None = None) -> None:
    out = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=30, cwd=cwd)
    if out.returncode != 0:
        raise MountError(f"{' '.join(argv)}: {(out.stderr or out.stdout).strip()[:300]}")


def mount_box(directory: Path, tree: Path, disk_bytes: int) -> Path:
    """Mount ``disk/`` (tmpfs) and ``root/`` (the overlay); return ``root``. Undoes itself on failure."""
    for path in (directory, tree):
        if _UNSAFE.search(str(path)):
            raise MountError(f"{path}: an overlay path must not hold ',', ':', '\\' or blanks")
    disk, root = directory / "disk", directory / "root"
    for d in (disk, root):
        d.mkdir(mode=0o700, exist_ok=True)
    _run(["mount", "-t", "tmpfs", "-o", f"size={disk_bytes},mode=0700,nosuid,nodev", "tmpfs", str(disk)])
    try:
        (disk / "upper").mkdir(mode=0o755)
        (disk / "work").mkdir(mode=0o700)
        link = directory / "lower"
        link.unlink(missing_ok=True)
        link.symlink_to(tree.resolve())
        # Paths relative to the box's directory: the box reads its root's mount options in /proc/mounts, and they
        # name neither this host's paths nor sandtrap.
        _run(["mount", "-t", "overlay", "-o", "lowerdir=seed:lower,upperdir=disk/upper,workdir=disk/work",
              "overlay", "root"], cwd=directory)  # fmt: skip
    except BaseException:
        unmount_box(directory)
        raise
    root.chmod(0o755)
    return root


def unmount_box(directory: Path) -> list[str]:
    """Unmount ``root`` then ``disk`` (lazily if busy); return what is still mounted below ``directory``."""
    prefix = str(directory) + "/"
    for point in sorted((p for p in mount_points() if p.startswith(prefix)), key=len, reverse=True):
        out = subprocess.run(["umount", point], capture_output=True, check=False, timeout=30)
        if out.returncode != 0:
            log.info("umount %s: %s; detaching it lazily", point, out.stderr.decode(errors="replace").strip())
            subprocess.run(["umount", "--lazy", point], capture_output=True, check=False, timeout=30)
    return [p for p in mount_points() if p.startswith(prefix)]


def write_seed(seed: Path, files: dict[str, tuple[bytes, int, float]]) -> None:
    """The per-box lower layer: each relative path's bytes, mode and mtime, owned by root (dirs 0755)."""
    seed.mkdir(mode=0o755, exist_ok=True)
    for rel, (data, mode, mtime) in sorted(files.items()):
        if rel.startswith("/") or ".." in rel.split("/"):
            raise MountError(f"not a relative path inside the box: {rel!r}")
        path = seed / rel
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, mode & 0o7777)
        try:
            os.write(fd, data)
            os.fchmod(fd, mode & 0o7777)
        finally:
            os.close(fd)
        os.utime(path, (mtime, mtime))
