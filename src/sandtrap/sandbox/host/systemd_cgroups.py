"""The cgroups a box's systemd manages (``sandbox.init: systemd``), handed over by the host after the start.

systemd as PID 1 on cgroup v1 needs a writable ``name=systemd`` hierarchy at /sys/fs/cgroup/systemd: it puts
itself in ``init.scope`` and every unit in ``system.slice/<unit>`` or ``user.slice/...`` and reads each unit's
processes back from there. The engine mounts the hierarchies read-only, and the box has no CAP_SYS_ADMIN to
change that. The backend already puts a small tmpfs over /sys/fs/cgroup/systemd (``mask_cgroupns``), with the
root's file names (a cgroup namespace's root has no ``release_agent``: systemd-detect-virt's container test);
systemd takes a tmpfs there for the legacy hierarchy and writes its agent's name into that ``release_agent``
file, as on a real v1 machine, where the kernel never reads it.

Into that tmpfs the host moves three real cgroup directories, made below the box's own cgroup in the host's
``name=systemd`` hierarchy: ``init.scope``, ``system.slice`` and ``user.slice`` (where systemd puts
everything it starts). The helper is a fresh ``python -I`` process (``setns`` into a mount namespace needs a
single-threaded caller): ``open_tree(OPEN_TREE_CLONE)`` each directory on the host, mark the copy
``nosuid,nodev,noexec``, ``setns`` into the box's mount namespace (its inode checked first: the pid was not
reused), and ``move_mount`` each onto a directory of that tmpfs, opened without following links. Then PID 1
(init.c, waiting for it) gets SIGUSR2 and execs systemd.

What the box can write there: ``cgroup.procs``/``tasks`` (moving its own processes between its own cgroups),
``notify_on_release`` and ``cgroup.clone_children`` of cgroups it made, and new cgroups below the three.
``name=systemd`` has no controller: no limit is in reach (those stay on the read-only memory, pids and cpu
hierarchies and on the box's parent above them), nor the hierarchy's ``release_agent`` (at the host's root
only; writing it needs CAP_SYS_ADMIN in the host's namespace since Linux 5.17 anyway). See SECURITY.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sandtrap.sandbox.host.boxwire import SOCKET_NAME

log = logging.getLogger(__name__)

HIERARCHY = Path("/sys/fs/cgroup/systemd")
SUBTREES = ("init.scope", "system.slice", "user.slice")
READY_SIGNAL = signal.SIGUSR2  # init.c execs systemd when it gets it (its wait_for_cgroups)
GIVE_UP_SIGNAL = signal.SIGUSR1  # ...and goes on as sandtrap's init on this one
BOOT_S = 10.0  # how long the backend waits for systemd to start the listener
# systemd refuses `daemon-reload` unless 16 MiB of /run stay free (its safety buffer); Debian mounts /run with
# 20% of the RAM. A tmpfs's size only caps it: pages are charged to the box's memory as they are written.
RUN_MIN_FOR_SYSTEMD = 48 * 1024 * 1024
_PATH = re.compile(r"^(/[A-Za-z0-9_.-]+)+$")
HELPER_TIMEOUT_S = 10.0

# Run as `python -I -c HELPER PID MNT_NS_INODE HOST_DIR SUBTREE...`. x86_64 and arm64 share the numbers of
# these syscalls (asm-generic since 5.2): open_tree 428, move_mount 429, mount_setattr 442.
HELPER = r"""
import ctypes, os, stat, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def call(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise SystemExit(f"{what}: {os.strerror(err)}")
    return result

pid, mnt_ns, host_dir, names = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
OPEN_TREE_CLONE, AT_EMPTY_PATH, AT_FDCWD = 1, 0x1000, -100
MOVE_MOUNT_F_EMPTY_PATH, MOVE_MOUNT_T_EMPTY_PATH = 0x4, 0x40
MOUNT_ATTR_NOSUID, MOUNT_ATTR_NODEV, MOUNT_ATTR_NOEXEC = 0x2, 0x4, 0x8
trees = []
for name in names:
    src = os.path.join(host_dir, name)
    try:
        os.mkdir(src, 0o755)
    except FileExistsError:
        pass
    tree = call(libc.syscall(428, AT_FDCWD, src.encode(), OPEN_TREE_CLONE | os.O_CLOEXEC), "open_tree " + src)
    attr = ctypes.create_string_buffer(struct.pack("QQQQ", MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC, 0, 0, 0))
    call(libc.syscall(442, tree, b"", AT_EMPTY_PATH, attr, 32), "mount_setattr " + src)
    trees.append((name, tree))
ns = os.open(f"/proc/{pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
if os.fstat(ns).st_ino != mnt_ns:
    raise SystemExit("the box's pid 1 is another process now")
call(libc.setns(ns, 0x20000), "setns")
top = os.open("/sys/fs/cgroup/systemd", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
if os.fstat(top).st_dev == os.stat("/sys/fs/cgroup").st_dev:
    raise SystemExit("/sys/fs/cgroup/systemd is not a mount of its own (the backend's tmpfs)")
for name, tree in trees:
    try:
        os.mkdir(name, 0o755, dir_fd=top)
    except FileExistsError:
        pass
    target = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
    if not stat.S_ISDIR(os.fstat(target).st_mode):
        raise SystemExit(name + " is not a directory")
    call(libc.syscall(429, tree, b"", target, b"", MOVE_MOUNT_F_EMPTY_PATH | MOVE_MOUNT_T_EMPTY_PATH), "move_mount " + name)
"""


class HandOverError(OSError):
    """The box's cgroups could not be handed over: its init then stays PID 1 (sandtrap's)."""


def box_cgroup(pid: int, container_id: str, parent: str = "", exact: str = "") -> Path:
    """The box's own directory in the host's ``name=systemd`` hierarchy, from its PID 1's /proc/PID/cgroup (as
    the host sees it)."""
    try:
        text = Path(f"/proc/{pid}/cgroup").read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as exc:
        raise HandOverError(f"cannot read the box's cgroups: {exc}") from exc
    return HIERARCHY / own_cgroup(text, container_id, parent, exact).lstrip("/")


def own_cgroup(proc_cgroup: str, container_id: str, parent: str = "", exact: str = "") -> str:
    """The ``name=systemd`` path in a /proc/PID/cgroup text, checked to be the engine's ``<parent>/<container
    id>`` (or ``.../<container id>`` without a parent of ours), or ``exact`` where the backend knows the whole
    path (nspawn's boxes: ``/<prefix>/<id>/box/payload``)."""
    paths = [
        row.split(":", 2)[2]
        for row in proc_cgroup.splitlines()
        if row.count(":") >= 2 and row.split(":", 2)[1] == "name=systemd"
    ]
    if len(paths) != 1 or not _PATH.fullmatch(paths[0]) or {".", ".."} & set(paths[0].split("/")):
        raise HandOverError(f"not one plain name=systemd cgroup: {paths!r}")
    path = paths[0]
    if exact:
        if path != exact:
            raise HandOverError(f"{path} is not the box's own cgroup {exact}")
        return path
    if (parent and path != f"{parent}/{container_id}") or not container_id or not path.endswith("/" + container_id):
        raise HandOverError(f"{path} is not the box's own cgroup")
    return path


async def hand_over(pid: int, mnt_ns: int, container_id: str, parent: str = "", exact: str = "") -> None:
    """Give the box (host ``pid`` of its PID 1, mount namespace inode ``mnt_ns``) its own cgroups for systemd,
    then tell its init to exec systemd. Raises :class:`HandOverError`; the box's init then goes on as
    sandtrap's (it stops waiting after 10 s). ``exact``: see :func:`own_cgroup`."""
    host_dir = await asyncio.to_thread(box_cgroup, pid, container_id, parent, exact)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-I",
        "-c",
        HELPER,
        str(pid),
        str(mnt_ns),
        str(host_dir),
        *SUBTREES,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(HELPER_TIMEOUT_S):
            _, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise HandOverError("the cgroup helper did not finish") from None
    if proc.returncode != 0:
        text = err.decode(errors="replace").strip().splitlines()
        raise HandOverError(f"the cgroup helper failed: {text[-1] if text else proc.returncode}")
    try:
        os.kill(pid, READY_SIGNAL)
    except OSError as exc:
        raise HandOverError(f"cannot signal the box's init: {exc}") from exc


async def boot(
    pid: int,
    mnt_ns: int | None,
    name: str,
    still_there: Callable[[], bool],
    container_id: str,
    parent: str = "",
    exact: str = "",
) -> None:
    """Every backend's way to systemd as a box's PID 1: :func:`hand_over` (``mnt_ns`` None: read from the pid),
    then wait until systemd has started the listener (ssh.service), :data:`BOOT_S` at most. When the hand-over
    fails, the box's init is told at once and goes on as sandtrap's. ``name``: the box's, for the log."""
    try:
        if mnt_ns is None:
            mnt_ns = (await asyncio.to_thread(os.stat, f"/proc/{pid}/ns/mnt")).st_ino
        await hand_over(pid, mnt_ns, container_id, parent, exact)
    except (HandOverError, OSError) as exc:
        log.warning("box %s keeps sandtrap's init: %s", name, exc)
        with contextlib.suppress(OSError):
            os.kill(pid, GIVE_UP_SIGNAL)
        return
    if not await asyncio.to_thread(wait_for_listener, pid, still_there):
        log.warning("box %s: systemd did not start ssh.service within %.0f s", name, BOOT_S)


def unavailable(local: bool, v1: bool, cgroupns: str, masked: bool) -> str:
    """Why boxes cannot run systemd here ('' when they can)."""
    if not local:
        return "the engine is not on this host"
    if os.geteuid() != 0:
        return "the honeypot does not run as root"
    if not v1:
        return "only cgroup v1 hosts are supported"
    if cgroupns != "private":
        return "it needs sandbox.docker.cgroupns: private"
    if not masked:
        return "it needs sandbox.docker.mask_cgroupns (a tmpfs over /sys/fs/cgroup/systemd)"
    if not HIERARCHY.is_dir():
        return f"no name=systemd hierarchy at {HIERARCHY}"
    return ""


def wait_for_listener(pid: int, still_there: Callable[[], bool], limit_s: float = BOOT_S) -> bool:
    """Wait until the box's listener (started by systemd as ssh.service) listens on its abstract socket, where
    the honeypot's logins go: read on the host from the box's network namespace (``/proc/PID/net/unix``)."""
    needle = " @" + SOCKET_NAME[1:].decode() + "\n"
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline and still_there():
        try:
            if needle in Path(f"/proc/{pid}/net/unix").read_text(errors="replace"):
                return True
        except OSError:
            return False
        time.sleep(0.02)
    return False
