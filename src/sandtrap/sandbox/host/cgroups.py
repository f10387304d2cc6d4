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
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
PREFIX = "sandtrap"
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CFS_PERIOD_US = 100_000


# Where systemd (cgroup v1, default accounting) has a login in each hierarchy: the session scope in its own
# named hierarchy, the unified one and pids; user.slice in the accounting controllers; the root elsewhere.
# The named hierarchy goes first: the session helper waits for it (session.c, -s) before it forks.
_SCOPE_ORDER = {"systemd": 0, "pids": 1, "unified": 2}
_SLICE_ONLY = {"memory", "cpu", "cpuacct", "blkio", "devices"}


def _scope_depth(hierarchy: str, parts: int) -> int:
    """How many levels of a unit path (``user.slice/user-0.slice/session-3.scope``) a hierarchy gets."""
    controllers = set(hierarchy.split(","))
    if controllers & {"systemd", "pids", "unified"}:
        return parts
    if controllers & _SLICE_ONLY:
        return 1
    return 0


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


def cpuset_for(name: str, cpus: float, cpu_list: list[int]) -> str:
    """``ceil(cpus)`` neighbouring CPUs of ``cpu_list`` (at most all of them), placed by the box's name so
    boxes spread over the host: ``nproc`` and /proc/cpuinfo then count what the quota gives, as on a
    small real machine. Empty (no pinning) when the CPUs are not known."""
    if not cpu_list:
        return ""
    n = max(1, min(len(cpu_list), math.ceil(cpus)))
    start = zlib.crc32(name.encode()) % len(cpu_list)
    picked = sorted(cpu_list[(start + i) % len(cpu_list)] for i in range(n))
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

    def join(
        self,
        name: str,
        container: str,
        unit: str,
        marker: bytes,
        wait_s: float = 0.25,
        inner: dict[str, str] | None = None,
    ) -> int:
        """Move the processes of a login into ``unit`` (e.g. ``user.slice/user-0.slice/session-3.scope``) under
        the box's own cgroup, in every hierarchy, as pam_systemd places a login. A login's processes are the
        ones still at the box's cgroup root whose environment holds ``marker`` (``XDG_SESSION_ID=3``), with
        everything below them; they are looked for up to ``wait_s`` (the engine starts an exec
        asynchronously). Limits are unchanged: they sit above. ``inner``: per hierarchy, the cgroup below the box's
        that is its namespace's root there (nspawn's ``payload`` in the named systemd one). Returns how many moved."""
        self._check(name)
        self._check(container)
        parts = unit.split("/")
        for part in parts:
            self._check(part)
        needle = marker + b"\0"
        hierarchies = [h for h in self._hierarchies() if (h / self.prefix / name / container).is_dir()]
        pids_root = self.root / "pids" / self.prefix / name / container
        deadline = time.monotonic() + wait_s
        while True:
            members = self._members(pids_root)
            heads = [p for p in members if needle in self._environ(p)]
            if heads or time.monotonic() >= deadline:
                break
            time.sleep(0.003)
        if not heads:
            return 0
        moved: set[int] = set()
        for hierarchy in sorted(hierarchies, key=lambda h: _SCOPE_ORDER.get(h.name, 9)):
            depth = _scope_depth(hierarchy.name, len(parts))
            if depth == 0:
                continue
            box = hierarchy / self.prefix / name / container
            target = box / (inner or {}).get(hierarchy.name, "")
            for part in parts[:depth]:
                parent, target = target, target / part
                if not target.is_dir():
                    target.mkdir(mode=0o755, exist_ok=True)
                    for knob in ("cpuset.cpus", "cpuset.mems"):  # a new cpuset is empty: nothing could join
                        if (parent / knob).exists():
                            self._write(target / knob, (parent / knob).read_text().strip())
            for _ in range(2):  # a second pass catches what forked while the first one moved
                for p in self._below(self._members_below(box), set(heads)):
                    try:
                        self._write(target / "cgroup.procs", str(p))
                        moved.add(p)
                    except OSError as exc:  # exited meanwhile
                        if exc.errno != errno.ESRCH:
                            raise
        return len(moved)

    @staticmethod
    def _members(cgroup: Path) -> list[int]:
        try:
            return [int(x) for x in (cgroup / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    @classmethod
    def _members_below(cls, cgroup: Path, max_cgroups: int = 1024) -> list[int]:
        """The processes of ``cgroup`` and of the cgroups below it (at most ``max_cgroups`` read): with systemd as
        the box's PID 1 (``sandbox.init``), a login's processes start in its ``system.slice/ssh.service``."""
        out: list[int] = []
        for n, (path, _, _) in enumerate(os.walk(cgroup)):
            if n >= max_cgroups:
                break
            out += cls._members(Path(path))
        return out

    @staticmethod
    def _environ(pid: int) -> bytes:
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                return b"\0" + f.read(65536)
        except OSError:
            return b""

    @staticmethod
    def _below(members: list[int], heads: set[int]) -> list[int]:
        """``members`` that are one of ``heads`` or descend from one."""
        parent: dict[int, int] = {}
        for p in members:
            try:
                stat = Path(f"/proc/{p}/stat").read_text()
                parent[p] = int(stat[stat.rindex(")") + 2 :].split()[1])
            except (OSError, ValueError, IndexError):
                continue
        out = []
        for p in parent:
            q, hops = p, 0
            while q not in heads and q in parent and hops < 64:
                q, hops = parent[q], hops + 1
            if q in heads:
                out.append(p)
        return out

    def remove(self, name: str) -> bool:
        """Remove the parent from every hierarchy, with whatever the engine left below it (session scopes
        in a stopped box's cgroup). False when some hierarchy still holds it (a running box, or the engine
        not done yet)."""
        self._check(name)
        done = True
        for hierarchy in self._hierarchies():
            target = hierarchy / self.prefix / name
            if not target.exists():
                continue
            dirs = [Path(d) for d, _, _ in os.walk(target, topdown=False)]
            for d in dirs:  # deepest first; a cgroup with a process in it refuses (EBUSY)
                try:
                    d.rmdir()
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                        log.warning("cannot remove %s: %s", d, exc)
                    done = False
                    break
        return done

    def sweep(self, keep: set[str] | frozenset[str] = frozenset(), top: bool = False) -> int:
        """Remove every parent not in ``keep`` that nothing uses any more (after a crash, or a box whose
        engine was slow to let go at stop); the kernel refuses ones with a process in them. ``top``: also
        the sensor's own directory when it is left empty. Returns how many parents went."""
        names: set[str] = set()
        for hierarchy in self._hierarchies():
            try:
                names |= {p.name for p in (hierarchy / self.prefix).iterdir() if p.is_dir()}
            except OSError:
                continue
        removed = sum(1 for n in sorted(names - set(keep)) if _NAME.fullmatch(n) and self.remove(n))
        if top and not keep:
            for hierarchy in self._hierarchies():
                try:
                    (hierarchy / self.prefix).rmdir()
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
