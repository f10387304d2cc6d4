"""Read-only /proc views a box gets instead of the kernel's host-wide files: lxcfs's per-cgroup renderings, and
sandtrap's own /proc/loadavg (:mod:`sandtrap.sandbox.host.loadavgfs`) in place of lxcfs's when it is served."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)

# /proc files lxcfs renders per container (from its cgroup), bind-mounted read-only over the kernel's.
# /proc/uptime is left out on purpose: a box that booted seconds ago is a tell; the host's uptime is not.
LXCFS_FILES = ("proc/cpuinfo", "proc/meminfo", "proc/stat", "proc/loadavg", "proc/diskstats", "proc/swaps")

# sandtrap's own /proc/loadavg: the box's tasks, load and newest pid, unlike lxcfs's.
LOADAVG_FILE = "proc/loadavg"


def lxcfs_binds(lxcfs_dir: str) -> list[str]:
    """Read-only binds (``host:box:ro``) of lxcfs's views, or none when lxcfs is not mounted there."""
    if not lxcfs_dir:
        return []
    root = Path(lxcfs_dir)
    try:
        if not (root / "proc" / "meminfo").exists():
            return []
        return [f"{root / name}:/{name}:ro" for name in LXCFS_FILES if (root / name).exists()]
    except OSError as exc:  # a mount whose lxcfs died: ENOTCONN
        log.warning("lxcfs at %s is not usable (%s): sandboxes show the host's /proc files", lxcfs_dir, exc)
        return []


class ProcViews:
    """The binds for one backend's boxes; a view that is not served is warned about once per reason."""

    def __init__(self, lxcfs_dir: str, loadavg_dir: str) -> None:
        self._lxcfs_dir = lxcfs_dir
        self._loadavg_dir = loadavg_dir
        self._warned: set[str] = set()

    def loadavg_bind(self) -> str | None:
        """The read-only bind of our loadavg file system's file, or None (then lxcfs's, with a warning) when it
        is off or not served there."""
        if not self._loadavg_dir:
            return None
        path = Path(self._loadavg_dir) / LOADAVG_FILE
        try:
            # A read, not a stat: the kernel answers a stat from its cache for a second after the daemon died,
            # while every read goes to the daemon (direct I/O). The host's own figures come back, at once.
            with path.open("rb") as f:
                f.read(256)
            self._warned.clear()
            return f"{path}:/{LOADAVG_FILE}:ro"
        except FileNotFoundError:
            reason = "nothing is mounted there (the set-up starts `sandtrap loadavgfs`)"
        except OSError as exc:  # a mount whose daemon died: ENOTCONN
            reason = str(exc)
        if reason not in self._warned:
            self._warned.add(reason)
            log.warning(
                "sandtrap loadavgfs at %s is not usable (%s): boxes show lxcfs's /proc/loadavg",
                self._loadavg_dir,
                reason,
            )
        return None

    def binds(self) -> list[str]:
        """lxcfs's views, with our /proc/loadavg in place of lxcfs's when it is served."""
        binds = lxcfs_binds(self._lxcfs_dir)
        ours = self.loadavg_bind()
        if ours is None:
            return binds
        return [b for b in binds if b.split(":")[1] != f"/{LOADAVG_FILE}"] + [ours]
