"""Each box's own /proc/loadavg: its tasks, its load averages and the newest pid of its pid namespace.

The kernel's /proc/loadavg counts the host's tasks; lxcfs's counts the box's but takes the last field (the
newest pid) from the host and says ``0/1`` until it has sampled a box. This view, served by the FUSE file
system in :mod:`sandtrap.sandbox.host.loadavgfs`, finds the reader's box from the reader's host pid (the root of
its cgroup namespace, from its mounts; its pid namespace), counts the box's threads (its cgroup and the login
scopes below it) at every read, keeps exponentially-damped load averages per box exactly as the kernel does
(``calc_load``, sampled every 5 s) and takes the last pid from the box's own numbering (NSpid), so the first
read of a fresh box is already its truth.

Every byte read from a box's /proc files is hostile (a task names itself): files are read with a bound,
parsed by position and number only, and work per refresh is bounded (``MAX_TASKS``); the tasks' states are
read at most once per ``CACHE_S`` per box, so a box reading in a loop costs the host one small read a time.
"""

from __future__ import annotations

import os
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# The kernel's fixed-point load average (include/linux/sched/loadavg.h).
FSHIFT = 11
FIXED_1 = 1 << FSHIFT
EXP = (1884, 2014, 2037)  # 1/exp(5s/1min), 1/exp(5s/5min), 1/exp(5s/15min) in fixed point
LOAD_FREQ_S = 5.0

CACHE_S = 1.0  # tasks' states (running, newest pid) are read at most once a second per box
MAX_TASKS = 4096  # threads whose state is read per refresh (the rest count towards the total only)
MAX_BOXES = 4096  # boxes tracked at once; the one read longest ago is dropped first
MAX_READERS = 65536  # readers whose last answer is kept (for CACHE_S)
IDLE_DROP_S = 3600.0  # a box nobody read for an hour is forgotten (its next read starts afresh)
STATUS_BYTES = 16384  # enough for State and NSpid unless a task has thousands of groups
TASKS_BYTES = 1 << 20
MAX_CGROUPS = 256  # cgroups walked below a box's root (its login scopes, which sandtrap makes)


def calc_load(load: int, exp: int, active: int) -> int:
    """One 5-second step of the kernel's exponentially-damped average (kernel/sched/loadavg.c)."""
    newload = load * exp + active * (FIXED_1 - exp)
    if active >= load:
        newload += FIXED_1 - 1
    return newload // FIXED_1


def fixed_power_int(x: int, n: int) -> int:
    """x**n in fixed point, rounded as the kernel rounds it."""
    result = FIXED_1
    while n:
        if n & 1:
            result = (result * x + (FIXED_1 >> 1)) >> FSHIFT
        n >>= 1
        if n:
            x = (x * x + (FIXED_1 >> 1)) >> FSHIFT
    return result


def calc_load_n(load: int, exp: int, active: int, n: int) -> int:
    """``n`` steps at once with the same number of active tasks (the kernel's catch-up after idle ticks)."""
    return calc_load(load, fixed_power_int(exp, n), active)


def format_load(x: int) -> str:
    x += FIXED_1 // 200  # rounds to the shown hundredth, as fs/proc/loadavg.c does
    return f"{x >> FSHIFT}.{((x & (FIXED_1 - 1)) * 100) >> FSHIFT:02d}"


def render(loads: tuple[int, int, int] | list[int], running: int, total: int, last_pid: int) -> bytes:
    avg = " ".join(format_load(x) for x in loads)
    return f"{avg} {running}/{total} {last_pid}\n".encode()


@dataclass(frozen=True)
class TaskStatus:
    state: str  # one letter: R, S, D, ...
    nspid: tuple[int, ...]  # pid in each pid namespace, outermost first; () if unknown


def parse_status(data: bytes) -> TaskStatus | None:
    """State and NSpid of /proc/<tid>/status. The task's name comes first and is the task's to choose; the
    kernel escapes a newline in it, and the last ``State:``/``NSpid:`` line wins should one slip through."""
    state = ""
    nspid: tuple[int, ...] = ()
    for line in data.split(b"\n")[1:]:
        key, sep, value = line.partition(b":")
        if not sep:
            continue
        if key == b"State":
            letter = value.strip()[:1]
            state = letter.decode() if letter.isalpha() and letter.isascii() else ""
        elif key == b"NSpid":
            words = value.split()
            nspid = tuple(int(w) for w in words) if 0 < len(words) <= 32 and all(w.isdigit() for w in words) else ()
    return TaskStatus(state, nspid) if state else None


def parse_cgroup(data: bytes, controller: str) -> str | None:
    """The task's cgroup path in the hierarchy with ``controller`` (cgroup v1), or its unified path when
    ``controller`` is "" (cgroup v2). None unless the path is absolute and normal (no ``..``)."""
    for line in data.split(b"\n"):
        parts = line.split(b":", 2)
        if len(parts) != 3:
            continue
        _, controllers, raw = parts
        names = controllers.decode("ascii", "replace").split(",")
        if (controller and controller in names) or (not controller and parts[0] == b"0" and not controllers):
            try:
                path = raw.decode()
            except UnicodeDecodeError:
                return None
            return path if _normal_path(path) else None
    return None


def _normal_path(path: str) -> bool:
    return path.startswith("/") and "\0" not in path and posixpath.normpath(path) == path


def parse_tasks(data: bytes) -> list[int]:
    return [int(w) for w in data.split() if w.isdigit() and len(w) <= 10]


@dataclass(frozen=True)
class CgroupLayout:
    """Where a cgroup lists its threads: ``<mount><path below root>/<tasks_file>``."""

    controller: str  # "pids" (v1) or "" (v2)
    mount: str
    root: str  # the mount's root within the hierarchy (mountinfo's 4th field), "/" on a host
    tasks_file: str

    def dir_path(self, cgroup: str) -> str | None:
        if self.root != "/":
            if not within(cgroup, self.root):
                return None
            cgroup = cgroup[len(self.root) :] or "/"
        return posixpath.join(self.mount, cgroup.lstrip("/"))

    def is_hierarchy(self, fstype: str, options: str) -> bool:
        return fstype == "cgroup" and self.controller in options.split(",") if self.controller else fstype == "cgroup2"


def within(path: str, root: str) -> bool:
    return root == "/" or path == root or path.startswith(root + "/")


def box_cgroup(mountinfo: bytes, layout: CgroupLayout) -> str | None:
    """The box's cgroup (its cgroup namespace's root) from a task's /proc/<pid>/mountinfo: the kernel shows the
    root of the box's own cgroup mount as a host path. None for a whole hierarchy (a host's) or none at all."""
    for line in mountinfo.decode("utf-8", "replace").splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if sep and len(fields) >= 5 and len(tail) >= 3 and layout.is_hierarchy(tail[0], tail[2]):
            root = _unescape(fields[3])
            return root if root != "/" and _normal_path(root) else None
    return None


def _unescape(field: str) -> str:
    """mountinfo's octal escapes (a space is \\040)."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_layout(mountinfo: str) -> CgroupLayout | None:
    """The cgroup v1 pids hierarchy if mounted, else the v2 unified one (from /proc/self/mountinfo)."""
    v2: CgroupLayout | None = None
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields, tail = pre.split(), post.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        root, mount = _unescape(fields[3]), _unescape(fields[4])
        if tail[0] == "cgroup" and "pids" in tail[2].split(","):
            return CgroupLayout("pids", mount, root, "tasks")
        if tail[0] == "cgroup2" and v2 is None:
            v2 = CgroupLayout("", mount, root, "cgroup.threads")
    return v2


def read_bounded(path: str, limit: int) -> bytes | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None
    try:
        chunks, size = [], 0
        while size < limit:
            chunk = os.read(fd, min(65536, limit - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)
    except OSError:
        return None
    finally:
        os.close(fd)


@dataclass
class Box:
    """One box's counts (refreshed at most every CACHE_S) and load averages (sampled every LOAD_FREQ_S)."""

    dir: str  # its cgroup's directory in the hierarchy: its threads are there and in the cgroups below
    loads: list[int] = field(default_factory=lambda: [0, 0, 0])
    sampled_at: float = 0.0
    counted_at: float = -1e18
    read_at: float = 0.0
    running: int = 0
    total: int = 0
    active: int = 0
    last_pid: dict[int, int] = field(default_factory=dict)  # pid-namespace level -> newest pid seen
    gone: bool = False


class LoadavgView:
    """Renders /proc/loadavg for the task with host pid ``pid``. ``proc`` is the host's procfs."""

    def __init__(self, layout: CgroupLayout | None, proc: str = "/proc", clock: Callable[[], float] = time.monotonic):
        self.layout = layout
        self.proc = proc
        self.clock = clock
        self.boxes: dict[str, Box] = {}
        self._cgroup_of_ns: dict[str, tuple[str, float]] = {}  # pid namespace -> (box cgroup, when found)
        self._answered: dict[int, tuple[str, float, bytes]] = {}  # reader's host pid -> (pid ns, when, content)
        self._own_pidns = self._pidns("self")

    def _pidns(self, pid: str) -> str:
        try:
            return os.readlink(f"{self.proc}/{pid}/ns/pid")
        except OSError:
            return ""

    def host(self) -> bytes:
        return read_bounded(f"{self.proc}/loadavg", 256) or b"0.00 0.00 0.00 1/1 1\n"

    def read(self, pid: int) -> bytes:
        ns = self._pidns(str(pid)) if pid > 0 else ""
        if not ns or ns == self._own_pidns or self.layout is None:
            return self.host()  # the host itself (or a reader already gone): the kernel's own file
        now = self.clock()
        seen = self._answered.get(pid)
        if seen and seen[0] == ns and now - seen[1] < CACHE_S:
            return seen[2]  # the same process reading again within the second (a loop): its last answer
        reader = parse_status(read_bounded(f"{self.proc}/{pid}/status", STATUS_BYTES) or b"")
        cgroup = self._box_cgroup(pid, ns, now)
        path = self.layout.dir_path(cgroup) if cgroup else None
        if cgroup is None or path is None:
            return self.host()
        box = self.boxes.get(cgroup) or self._track(cgroup, path, now)
        level = len(reader.nspid) - 1 if reader and len(reader.nspid) > 1 else 1
        own = reader.nspid[level] if reader and len(reader.nspid) > level else 0
        if now - box.counted_at >= CACHE_S:
            self._count(box, now)
        else:  # the number of threads, the one figure a box's own commands can check at once: one small read
            box.total = self._total(box) or box.total
        box.read_at = now
        last = max(box.last_pid.get(level, 0), own)
        box.last_pid[level] = last
        content = render(box.loads, max(1, box.running), max(box.total, 1), last)
        if len(self._answered) >= MAX_READERS:
            self._answered.clear()
        self._answered[pid] = (ns, now, content)
        return content

    def _box_cgroup(self, pid: int, ns: str, now: float) -> str | None:
        """The reader's box: the root of its cgroup namespace (its logins sit in scopes below), found from
        its mounts, else the reader's own cgroup. Kept a second per pid namespace."""
        assert self.layout is not None
        found = self._cgroup_of_ns.get(ns)
        if found and now - found[1] < CACHE_S:
            return found[0]
        own = parse_cgroup(read_bounded(f"{self.proc}/{pid}/cgroup", 65536) or b"", self.layout.controller)
        if own is None:
            return None
        root = box_cgroup(read_bounded(f"{self.proc}/{pid}/mountinfo", 1 << 18) or b"", self.layout)
        cgroup = root if root and within(own, root) else own
        if len(self._cgroup_of_ns) >= MAX_BOXES:
            self._cgroup_of_ns.clear()
        self._cgroup_of_ns[ns] = (cgroup, now)
        return cgroup

    def _tids(self, box: Box) -> list[int] | None:
        """The threads in the box's cgroup and the ones below it (bounded), None when it is gone."""
        assert self.layout is not None
        tids: list[int] = []
        dirs, walked = [box.dir], 0
        while dirs and walked < MAX_CGROUPS:
            d = dirs.pop()
            walked += 1
            data = read_bounded(f"{d}/{self.layout.tasks_file}", TASKS_BYTES)
            if data is None and d == box.dir:
                return None
            tids += parse_tasks(data or b"")
            try:
                with os.scandir(d) as entries:
                    dirs += [e.path for e in entries if e.is_dir(follow_symlinks=False)]
            except OSError:
                continue
        return tids

    def _total(self, box: Box) -> int:
        """All threads of the box: pids.current where the pids controller counts them, else the walk."""
        current = read_bounded(f"{box.dir}/pids.current", 32)
        if current is not None and current.strip().isdigit():
            return int(current)
        return len(self._tids(box) or [])

    def _track(self, cgroup: str, path: str, now: float) -> Box:
        if len(self.boxes) >= MAX_BOXES:
            del self.boxes[min(self.boxes, key=lambda k: self.boxes[k].read_at)]
        box = Box(path, sampled_at=now, read_at=now)
        self._count(box, now)  # counted at once; its load from now on, sampled first 5 s later (as after boot)
        self.boxes[cgroup] = box
        return box

    def _count(self, box: Box, now: float) -> None:
        box.counted_at = now
        tids = self._tids(box)
        if tids is None:
            box.gone = True
            return
        running = active = seen = 0
        newest: dict[int, int] = {}
        for tid in tids[:MAX_TASKS]:
            status = parse_status(read_bounded(f"{self.proc}/{tid}/status", STATUS_BYTES) or b"")
            if status is None:
                continue  # exited since the list was read
            seen += 1
            running += status.state == "R"
            active += status.state in "RD"
            for level, nr in enumerate(status.nspid[1:], 1):
                newest[level] = max(newest.get(level, 0), nr)
        box.running, box.active = running, active
        box.total = seen + max(0, len(tids) - MAX_TASKS)
        for level, nr in newest.items():
            box.last_pid[level] = max(box.last_pid.get(level, 0), nr)

    def sample(self) -> float:
        """Advance every tracked box's load averages by the 5-second periods that passed; forget boxes that
        are gone or unread for an hour. Returns the seconds until the next sample is due."""
        now = self.clock()
        due = LOAD_FREQ_S
        for cgroup, box in list(self.boxes.items()):
            if box.gone or now - box.read_at > IDLE_DROP_S:
                del self.boxes[cgroup]
                continue
            periods = int((now - box.sampled_at) // LOAD_FREQ_S)
            if periods > 0:
                if now - box.counted_at >= CACHE_S:
                    self._count(box, now)
                if box.gone:
                    del self.boxes[cgroup]
                    continue
                box.loads = [
                    calc_load_n(x, e, box.active * FIXED_1, periods) for x, e in zip(box.loads, EXP, strict=True)
                ]
                box.sampled_at += periods * LOAD_FREQ_S
            due = min(due, box.sampled_at + LOAD_FREQ_S - now)
        return max(0.05, due)
