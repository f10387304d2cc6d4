"""Per-box parent cgroups: the limits sit one level above the box's own cgroup.

A box runs in a private cgroup namespace, so its own cgroup is what it sees as the root. When the
engine puts the memory, CPU and pids limits on that cgroup, ``cat /sys/fs/cgroup/memory/memory.limit_in_bytes``
in the box shows 268435456 where a real machine's root cgroup shows no limit. Here the honeypot
creates a parent cgroup per box (``/sandtrap/<box>`` in the memory, pids and cpu hierarchies), writes the
limits there and reads them back, and only then asks the engine for a container under it
(``HostConfig.CgroupParent``) with no limits of its own. The kernel enforces a parent's limits on
everything below it (memory hierarchically, with ``memory.use_hierarchy`` checked; pids and CFS quota
always), so the box is bounded exactly as before, its namespace root reads "unlimited", and lxcfs
(which takes the lowest limit up the tree) still shows the box's memory in /proc/meminfo.

This needs the engine's cgroup driver to be ``cgroupfs`` on cgroup v1 and the honeypot to run as root on
the engine's host; anywhere else :func:`available` says why and the backend keeps the limits on the
container itself.
"""

from __future__ import annotations

import errno
import logging
import math
import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PREFIX = "sandtrap"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CFS_PERIOD_US = 100_000


class CgroupError(OSError):
    """A parent cgroup could not be made or did not hold the limits written to it."""


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes
    memory_swap: int  # bytes, memory + swap (equal to memory: no swap)
    cpus: float
    pids: int

    @property
    def quota_us(self) -> int:
        return max(1000, round(self.cpus * CFS_PERIOD_US))


def cpuset_for(name: str, cpus: float, host_cpus: int) -> str:
    """``ceil(cpus)`` neighbouring CPUs (at most all of them), placed by the box's name so boxes spread over
    the host: ``nproc`` and /proc/cpuinfo then count what the quota gives, as on a small real machine."""
    n = max(1, min(host_cpus, math.ceil(cpus)))
    start = zlib.crc32(name.encode()) % host_cpus if host_cpus else 0
    picked = sorted((start + i) % host_cpus for i in range(n))
    return ",".join(str(c) for c in picked)


class ParentCgroups:
    """Creates, checks and removes the per-box parents under ``<root>/<controller>/<prefix>/``."""

    CONTROLLERS = ("memory", "pids", "cpu")

    def __init__(self, root: Path = ROOT, prefix: str = PREFIX) -> None:
        self.root = root
        self.prefix = prefix

    def available(self) -> str:
        """Empty when parents can be made here, else the reason they cannot."""
        if os.geteuid() != 0:
            return "the honeypot does not run as root"
        try:
            if (self.root / "cgroup.controllers").exists():
                return "cgroup v2 is not supported yet (limits stay on the container)"
            for ctrl in self.CONTROLLERS:
                if not (self.root / ctrl / "cgroup.procs").exists():
                    return f"no cgroup v1 {ctrl} hierarchy at {self.root / ctrl}"
            if not os.access(self.root / "memory", os.W_OK):
                return f"{self.root / 'memory'} is not writable"
        except OSError as exc:
            return f"cannot read {self.root}: {exc}"
        return ""

    def path(self, name: str) -> str:
        """The ``CgroupParent`` the engine is given (cgroupfs driver: a path below each hierarchy's root)."""
        return f"/{self.prefix}/{self._check(name)}"

    def create(self, name: str, limits: Limits) -> str:
        """Make the parent in each hierarchy, write the limits, read them back; undo on any failure."""
        self._check(name)
        try:
            for ctrl in self.CONTROLLERS:
                top = self.root / ctrl / self.prefix
                top.mkdir(mode=0o755, exist_ok=True)
                (top / name).mkdir(mode=0o755, exist_ok=True)
            mem = self.root / "memory" / self.prefix / name
            self._write(mem / "memory.use_hierarchy", "1", optional=True)
            self._write(mem / "memory.limit_in_bytes", str(limits.memory))
            swap = mem / "memory.memsw.limit_in_bytes"
            if swap.exists():  # swap accounting on: memory + swap bounded too
                self._write(swap, str(max(limits.memory_swap, limits.memory)))
            self._write(self.root / "pids" / self.prefix / name / "pids.max", str(limits.pids))
            cpu = self.root / "cpu" / self.prefix / name
            self._write(cpu / "cpu.cfs_period_us", str(CFS_PERIOD_US))
            self._write(cpu / "cpu.cfs_quota_us", str(limits.quota_us))
            self._verify(name, limits)
        except OSError as exc:
            self.remove(name)
            raise CgroupError(exc.errno or errno.EIO, f"parent cgroup {self.path(name)}: {exc}") from exc
        return self.path(name)

    def _verify(self, name: str, limits: Limits) -> None:
        base = self.root
        checks = [
            (base / "memory" / self.prefix / name / "memory.limit_in_bytes", limits.memory),
            (base / "pids" / self.prefix / name / "pids.max", limits.pids),
            (base / "cpu" / self.prefix / name / "cpu.cfs_quota_us", limits.quota_us),
        ]
        for path, want in checks:
            got = path.read_text().strip()
            if path.name == "memory.limit_in_bytes":
                # The kernel rounds down to whole pages.
                ok = got.isdigit() and want - os.sysconf("SC_PAGE_SIZE") < int(got) <= want
            else:
                ok = got == str(want)
            if not ok:
                raise CgroupError(errno.EIO, f"{path} reads {got!r} after writing {want}")
        hierarchy = base / "memory" / self.prefix / name / "memory.use_hierarchy"
        if hierarchy.exists() and hierarchy.read_text().strip() != "1":
            raise CgroupError(errno.EIO, f"{hierarchy} is 0: the limit would not bind the box's cgroup")

    def remove(self, name: str) -> bool:
        """Remove the parent from every hierarchy (the engine removed the box's own cgroup when it stopped).
        False when some hierarchy still holds it (a running box, or the engine not done yet)."""
        self._check(name)
        done = True
        for hierarchy in self._hierarchies():
            target = hierarchy / self.prefix / name
            try:
                target.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    log.warning("cannot remove %s: %s", target, exc)
                done = False
        return done

    def sweep(self, keep: set[str] | frozenset[str] = frozenset()) -> int:
        """Remove every parent not in ``keep`` that nothing uses any more (after a crash); the kernel refuses
        ones with a cgroup or a process in them. Returns how many hierarchies' directories went."""
        removed = 0
        for hierarchy in self._hierarchies():
            top = hierarchy / self.prefix
            try:
                entries = [p for p in top.iterdir() if p.is_dir() and p.name not in keep]
            except OSError:
                continue
            for entry in entries:
                try:
                    entry.rmdir()
                    removed += 1
                except OSError:
                    pass
        return removed

    def _hierarchies(self) -> list[Path]:
        try:
            return [p for p in self.root.iterdir() if p.is_dir() and not p.is_symlink()]
        except OSError:
            return []

    @staticmethod
    def _check(name: str) -> str:
        if not _NAME.fullmatch(name) or name in {".", ".."}:
            raise ValueError(f"not a cgroup name: {name!r}")
        return name

    @staticmethod
    def _write(path: Path, value: str, optional: bool = False) -> None:
        try:
            with open(path, "w", encoding="ascii") as f:
                f.write(value)
        except FileNotFoundError:
            if not optional:
                raise
