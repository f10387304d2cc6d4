"""The /proc views (lxcfs, sandtrap loadavgfs: host/procviews.py) in an nspawn box, bound in once it runs.

nspawn's ``--bind-ro`` cannot take them: nspawn stats a bind's source from its child, already in the box's new
PID namespace with no init yet, and lxcfs answers that stat ENOENT (the box never starts). So each view is
bound after the box's PID 1 runs, by :data:`MOVER` (a few lines of the host's Python, single-threaded as setns
into a mount namespace needs): ``open_tree(OPEN_TREE_CLONE)`` of the view on the host, ``setns`` into the box's
mount namespace, ``move_mount`` over the box's /proc file, then a read-only remount of that bind. The box's own
processes read them as a Docker box's do (lxcfs renders each from the reader's cgroup).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Sequence

from sandtrap.errors import SandboxError

# argv: the box's PID 1 (host pid), then pairs of (view on the host, /proc file in the box).
# open_tree 428, move_mount 429 (every architecture's number since 5.2); OPEN_TREE_CLONE 1, O_CLOEXEC 0x80000,
# MOVE_MOUNT_F_EMPTY_PATH 4, AT_FDCWD -100, CLONE_NEWNS 0x20000; MS_REMOUNT|MS_BIND|MS_RDONLY|nosuid|nodev|noexec.
MOVER = (
    "import ctypes,os,sys\n"
    "c=ctypes.CDLL(None,use_errno=True)\n"
    "c.syscall.restype=ctypes.c_long\n"
    "def k(r,w):\n"
    " if r<0:sys.exit(w+': '+os.strerror(ctypes.get_errno()))\n"
    " return r\n"
    "a=sys.argv[2:]\n"
    "t=[(k(c.syscall(428,-100,s.encode(),0x80001),'open_tree '+s),d) for s,d in zip(a[::2],a[1::2])]\n"
    "k(c.setns(os.open('/proc/'+sys.argv[1]+'/ns/mnt',os.O_RDONLY),0x20000),'setns')\n"
    "for f,d in t:\n"
    " k(c.syscall(429,f,b'',-100,d.encode(),4),'move_mount '+d)\n"
    " k(c.mount(None,d.encode(),None,0x1000|0x20|0x1|0x2|0x4|0x8,None),'read-only '+d)\n"
)


def pairs(binds: Sequence[str]) -> list[str]:
    """``host:box:ro`` binds (ProcViews.binds) as the MOVER's argument pairs; only /proc files in the box."""
    out: list[str] = []
    for bind in binds:
        source, target = bind.split(":")[:2]
        if not target.startswith("/proc/") or ".." in target.split("/"):
            raise ValueError(f"not a /proc view: {bind!r}")
        out += [source, target]
    return out


async def bind_views(init_pid: int, binds: Sequence[str]) -> None:
    """Bind the views over the box's /proc files (none: nothing to do)."""
    if not binds:
        return
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-I", "-S", "-c", MOVER, str(init_pid), *pairs(binds),
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SandboxError(f"binding the /proc views into the box: {out.decode(errors='replace')[:300]}")
