"""How a box is started: systemd-nspawn's command line, every hardening item in one place (README "nspawn boxes").

- ``--register=no --keep-unit``: no machined, no scope of its own (PID 1 here is not systemd); nspawn and the box
  stay in the cgroups they are started in: a ``box`` cgroup below the per-box parent with the memory, pids and CPU
  limits (:mod:`sandtrap.sandbox.host.cgroups`), entered by a tiny ``sh`` before it execs nspawn, through
  ``unshare --cgroup``: the box's cgroup is its namespace's root (``/proc/self/cgroup`` reads ``/``, as a machine's).
- ``--private-network``: a network namespace with ``lo`` only (network.mode none). With network.mode capture the
  backend then links the box's ``eth0`` into it from the capture gateway's namespace (``Gateway.attach``, the code
  Docker's boxes use): its only peer. Private PID, IPC, UTS and mount namespaces are nspawn's own.
- ``--drop-capability``: every capability but ``sandbox.nspawn.cap_add`` (Docker's list by default).
- ``--system-call-filter``: nspawn's allow-list, with what Docker allows only with CAP_SYS_ADMIN refused
  (:data:`DENIED`; EPERM: nspawn 252 cannot name an errno); io_uring and clone3 allowed there and answered
  ENOSYS, and clone with CLONE_NEWUSER refused, by a filter of sandtrap's loaded just before nspawn
  starts (``seccomp.py``), as Docker's boxes have them.
- ``--resolv-conf=off --timezone=off --link-journal=no``: nothing of the host's is copied or bound in; the only
  host files a box sees are the read-only /proc views (``--bind-ro``), and /run/host (nspawn's own) is unmounted
  by the backend before the box is used (:data:`TIDY`).
- ``SYSTEMD_NSPAWN_TMPFS_TMP=0``: /tmp is on the box's overlay (bounded by its disk, diffed, kept).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from sandtrap.config import NspawnSettings, SandboxSettings
from sandtrap.sandbox.host.cgroups import ParentCgroups
from sandtrap.sandbox.host.systemd_cgroups import RUN_MIN_FOR_SYSTEMD
from sandtrap.sandbox.nspawn.seccomp import ENOSYS_CALLS, LOADER

# Every capability by name (include/uapi/linux/capability.h), without the CAP_ prefix.
ALL_CAPS = (
    "CHOWN DAC_OVERRIDE DAC_READ_SEARCH FOWNER FSETID KILL SETGID SETUID SETPCAP LINUX_IMMUTABLE NET_BIND_SERVICE "
    "NET_BROADCAST NET_ADMIN NET_RAW IPC_LOCK IPC_OWNER SYS_MODULE SYS_RAWIO SYS_CHROOT SYS_PTRACE SYS_PACCT "
    "SYS_ADMIN SYS_BOOT SYS_NICE SYS_RESOURCE SYS_TIME SYS_TTY_CONFIG MKNOD LEASE AUDIT_WRITE AUDIT_CONTROL SETFCAP "
    "MAC_OVERRIDE MAC_ADMIN SYSLOG WAKE_ALARM BLOCK_SUSPEND AUDIT_READ PERFMON BPF CHECKPOINT_RESTORE"
).split()
# What Docker's default profile allows only with CAP_SYS_ADMIN (or CAP_PERFMON, CAP_BPF), which boxes never have:
# refused here too. Without it a box could make a user namespace (unshare -U) and mount, pivot or set namespaces
# inside it, and reach the keyrings, which are not namespaced. clone() and clone3() with CLONE_NEWUSER, which
# nspawn 252 cannot refuse (it takes names only), are refused by sandtrap's own filter (seccomp.py).
# What nspawn's allow-list grants only with a capability boxes do not keep, and Docker's default profile grants
# anyway: ptrace of one's own processes (strace, gdb; the kernel's ptrace rules still apply) and mlock. And
# io_uring and clone3, which nspawn then lets through for sandtrap's own filter to answer ENOSYS (seccomp.py).
ALLOWED = (*ENOSYS_CALLS, "ptrace", "process_vm_readv", "process_vm_writev", "@memlock")
DENIED = (
    *("unshare", "setns", "mount", "umount2", "pivot_root", "mount_setattr"),
    *("fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree"),
    *("add_key", "keyctl", "request_key", "bpf", "perf_event_open", "userfaultfd"),
)
# Run in the new box before it is used: nspawn's /run/host (the host's os-release, a propagation directory, files
# naming the container manager) unmounted and removed; /run and /dev/shm sized as Docker's boxes have them, not
# as shares of the host's RAM (their pages are charged to the box's memory either way).
# And, as Docker's mask_cgroupns: a small tmpfs over the named systemd hierarchy (nspawn mounts it writable) with
# the files a real root of it has (its namespace root has no release_agent: how systemd-detect-virt spots a
# container), as box/init.c cgroup_root_files() gives Docker's.
# With systemd as PID 1 (sandbox.init: systemd) /run is as large as Docker's boxes have it for systemd
# (docker/spec.py run_for_systemd: systemd refuses daemon-reload with less than 16 MiB free there).
RUN_SIZE = "16m"
TIDY = (
    "umount -R /run/host && rm -rf --one-file-system /run/host"
    ' && mount -o remount,size="$1" /run && mount -o remount,size=64m /dev/shm'
    " && if [ -d /sys/fs/cgroup/systemd ]; then"
    " mount -t tmpfs -o rw,nosuid,nodev,noexec,size=16k,nr_inodes=64,mode=755 tmpfs /sys/fs/cgroup/systemd"
    " && cd /sys/fs/cgroup/systemd && for f in cgroup.clone_children notify_on_release cgroup.sane_behavior;"
    " do echo 0 > $f; done && : > cgroup.procs && : > release_agent && : > tasks && chmod 444 cgroup.sane_behavior;"
    " fi"
)


def run_size(box: SandboxSettings, systemd: bool) -> str:
    """The size /run is remounted with (TIDY's ``$1``): 16 MiB, or with systemd 20% of ``memory``, 48 MiB at least."""
    if not systemd:
        return RUN_SIZE
    return f"{max(RUN_MIN_FOR_SYSTEMD, box.memory // 5) // 1024}k"


def dropped_caps(keep: Sequence[str]) -> list[str]:
    wanted = {c.upper().removeprefix("CAP_") for c in keep}
    return [f"CAP_{c}" for c in ALL_CAPS if c not in wanted]


def network_args(box: SandboxSettings) -> list[str]:
    """The box's network namespace: its own, with ``lo`` only; with network.mode capture the capture gateway adds
    ``eth0`` to it once the box's PID 1 runs (backend ``_link``). nspawn's own ``--network-veth`` is not used: its
    host end would be in the host's namespace, not the gateway's. (internal is refused: backend.check_network.)"""
    if box.network not in ("none", "capture"):
        raise ValueError(f"network.mode {box.network!r} has no nspawn form")
    return ["--private-network"]


# As Docker's boxes (docker/spec.py OomScoreAdj): when the host runs short, the kernel's OOM killer takes a box's
# processes before the honeypot's. Inherited by everything in the box; raising it back needs CAP_SYS_RESOURCE.
OOM_SCORE_ADJ = 500
BOX_CGROUP = "box"  # the box's own cgroup below its parent (where login scopes are made, as on Docker)
# Where the box's cgroup namespace is rooted below BOX_CGROUP, per hierarchy: nspawn moves the box into a "payload"
# cgroup of its own in systemd's named hierarchy (and gives the box a namespace rooted there).
INNER_CGROUPS = {"systemd": "payload"}


def pick_hierarchies(mounted: Iterable[str]) -> tuple[str, ...]:
    """Every cgroup v1 hierarchy the box gets a cgroup of its own in, the limits' controllers first: as a Docker
    container has one in each. A hierarchy it were left out of would be its cgroup namespace's root there, the
    host's: its cpuacct.usage the whole host's, the host's cgroup tree listed in it (read-only, but a leak).
    Not the unified (v2) one: nspawn then cannot move itself."""
    rest = sorted(h for h in mounted if h not in ParentCgroups.CONTROLLERS and h != "unified")
    return (*ParentCgroups.CONTROLLERS, *rest)


def box_hierarchies(root: Path) -> tuple[str, ...]:
    """:func:`pick_hierarchies` of the v1 hierarchies mounted under ``root`` (one directory each, not the
    co-mount's links such as cpu -> cpu,cpuacct)."""
    return pick_hierarchies(
        p.name for p in root.iterdir() if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists()
    )


def cgroup_procs(root: Path, prefix: str, name: str, hierarchies: Sequence[str]) -> list[str]:
    """The ``cgroup.procs`` of the box's own cgroup in each hierarchy (made here: below the parent). A new cpuset
    cgroup gets its parent's CPUs and memory nodes (an empty one takes no process)."""
    out = []
    for hierarchy in hierarchies:
        top = root / hierarchy
        box = top / prefix / name / BOX_CGROUP
        box.mkdir(mode=0o755, parents=True, exist_ok=True)
        parent = top
        for part in (prefix, name, BOX_CGROUP):
            here = parent / part
            for knob in ("cpuset.cpus", "cpuset.mems"):
                if (parent / knob).exists() and not (here / knob).read_text().strip():
                    (here / knob).write_text((parent / knob).read_text().strip())
            parent = here
        out.append(str(box / "cgroup.procs"))
    return out


def argv(
    settings: NspawnSettings,
    box: SandboxSettings,
    machine: str,
    root: Path,
    binds: Sequence[str],
    procs: Sequence[str],
    filter_bpf: Path,
    systemd: bool = False,
) -> list[str]:
    """``sh -c`` entering the cgroups ``procs`` (each a ``cgroup.procs`` file), then a cgroup namespace of its own,
    then sandtrap's seccomp filter (``filter_bpf``, seccomp.py), then nspawn running /sbin/init (each ``exec``: nspawn
    keeps the pid that was started). ``systemd``: init waits for the host's hand-over of the box's cgroups and
    becomes systemd (``--systemd``, as on Docker: docker/spec.py): CAP_SETPCAP kept (units shrink their own
    bounding set), /run/lock as Debian mounts it, and systemd's halt signal as the stop signal."""
    keep = [*settings.cap_add, *(["SETPCAP"] if systemd else [])]
    nspawn = [
        *(sys.executable, "-I", "-S", "-c", LOADER, str(filter_bpf)),
        settings.nspawn,
        "--quiet",
        "--register=no",
        "--keep-unit",
        f"--directory={root}",
        f"--machine={machine}",
        f"--hostname={box.hostname}",
        # init takes HOSTNAME as the sign of an engine's environment and starts again with a kernel's: PID 1's
        # environ (container=systemd-nspawn, container_uuid, NOTIFY_SOCKET, ...) is gone before the box is used
        f"--setenv=HOSTNAME={box.hostname}",
        *network_args(box),
        "--resolv-conf=off",
        "--timezone=off",
        "--link-journal=no",
        "--console=pipe",  # no /dev/console pty: PID 1 has no terminal, as on Docker
        # what sandtrap's init takes as "stop" (3 s grace, then SIGKILL to all); systemd's "halt"
        "--kill-signal=" + ("SIGRTMIN+3" if systemd else "SIGTERM"),
        f"--oom-score-adjust={OOM_SCORE_ADJ}",
        "--drop-capability=" + ",".join(dropped_caps(keep)),
        *(["--tmpfs=/run/lock:mode=1777,size=5m,nosuid,nodev,noexec"] if systemd else []),
        "--system-call-filter=" + " ".join(ALLOWED),
        "--system-call-filter=~" + " ".join(DENIED),
        *(["--no-new-privileges=yes"] if settings.no_new_privileges else []),
        *(f"--bind-ro={b.removesuffix(':ro')}" for b in binds),
        "/sbin/init",
        *(["--systemd"] if systemd else []),
    ]
    enter = "".join(f'echo $$ > "{p}" && ' for p in procs)
    # A UTS namespace of nspawn's own with the box's domain name, which the box's UTS namespace inherits (nspawn sets
    # only the host name): init writes /etc/hosts and resolv.conf from it, as on Docker (its Domainname).
    domain = 'printf %s "$0" > /proc/sys/kernel/domainname && exec "$@"'
    return [
        "/bin/sh", "-c", enter + 'exec unshare --cgroup --uts -- /bin/sh -c "$0" "$@"', domain, box.domain, *nspawn,
    ]  # fmt: skip


def environment() -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "SYSTEMD_NSPAWN_TMPFS_TMP": "0",
        "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "0",  # legacy cgroups: no "payload" cgroup at the hierarchy root
        "LANG": "C",
    }
