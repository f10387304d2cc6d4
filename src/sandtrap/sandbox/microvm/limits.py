"""A cgroup per VM: QEMU's memory, threads and CPU bounded by the kernel (cgroup v1, as for the Docker boxes).

Each VM gets ``/sys/fs/cgroup/{memory,pids,cpu}/sandtrap-vm/<vm name>`` (host/cgroups.py makes, checks and
removes them), with:

- memory: the guest's RAM (``sandbox.microvm.memory``, fixed by ``-m``), the TCG translation cache under TCG, and
  ``sandbox.microvm.memory_overhead`` for QEMU itself; no swap on top. A QEMU past it is killed by the kernel's
  OOM killer (only QEMU is in the cgroup), which :meth:`VMCgroups.oom_kills` tells apart from other kills;
- pids: ``sandbox.microvm.pids_max`` threads (QEMU cannot fork: ``-sandbox on,spawn=deny``);
- cpu: a CFS quota of ``vcpus`` whole CPUs (TCG's vCPU threads and QEMU's main loop share it).

QEMU is put in them before it starts (the shell that execs it writes its own pid to ``cgroup.procs``), so
nothing it allocates escapes the accounting. A VM's cgroups go when its QEMU has exited (``remove``) and, after a
crash of the honeypot, by reconciliation (``sweep``): the kernel refuses to remove one that still holds a process.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from sandtrap.config import MicroVMSettings
from sandtrap.sandbox.host.cgroups import ROOT, Limits, ParentCgroups

log = logging.getLogger(__name__)

PREFIX = "sandtrap-vm"


def vm_limits(settings: MicroVMSettings, tcg: bool) -> Limits:
    memory = settings.memory + (settings.tcg_cache if tcg else 0) + settings.memory_overhead
    return Limits(memory=memory, memory_swap=memory, cpus=float(settings.vcpus), pids=settings.pids_max)


@dataclass(frozen=True)
class VMCgroup:
    """One VM's cgroups: the ``cgroup.procs`` files QEMU joins before it execs."""

    name: str
    procs: tuple[Path, ...]
    limits: Limits


class VMCgroups:
    """The VMs' cgroups on this host; ``reason`` says why there are none (not root, cgroup v2, ...)."""

    def __init__(self, root: Path = ROOT, prefix: str = PREFIX) -> None:
        self._parents = ParentCgroups(root, prefix)
        self.reason = self._parents.available()
        if self.reason:
            log.warning("micro-VMs run without a cgroup of their own: %s", self.reason)

    @property
    def available(self) -> bool:
        return not self.reason

    def create(self, name: str, limits: Limits) -> VMCgroup | None:
        """The VM's cgroups with ``limits`` written and read back (None where cgroups are not available)."""
        if self.reason:
            return None
        self._parents.create(name, limits)  # CgroupError (an OSError) naming the cgroup
        root, prefix = self._parents.root, self._parents.prefix
        procs = tuple(root / ctrl / prefix / name / "cgroup.procs" for ctrl in ParentCgroups.CONTROLLERS)
        return VMCgroup(name, procs, limits)

    def path(self, controller: str, name: str) -> Path:
        return self._parents.root / controller / self._parents.prefix / name

    def oom_kills(self, name: str) -> int:
        """How many processes the kernel's OOM killer took in the VM's memory cgroup (0 when unknown)."""
        try:
            text = (self.path("memory", name) / "memory.oom_control").read_text()
        except OSError:
            return 0
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill" and value.strip().isdigit():
                return int(value)
        return 0

    def remove(self, name: str) -> bool:
        if self.reason:
            return True
        try:
            return self._parents.remove(name)
        except (OSError, ValueError) as exc:
            log.warning("cgroups of %s not removed: %s", name, exc)
            return False

    def sweep(self, names: set[str]) -> int:
        """Remove the cgroups of these VMs (stopped ones: after a crash) where they exist; how many went. Only
        the names given: another sensor's VMs on this host, or one being created, are not touched."""
        if self.reason:
            return 0
        present = {n for n in names if any(self.path(c, n).is_dir() for c in ParentCgroups.CONTROLLERS)}
        return sum(1 for n in sorted(present) if self.remove(n))
