"""What a Docker box is made of: its create body (every hardening item in one place), its labels and names,
and the archives that seed and plant its files."""

from __future__ import annotations

import io
import re
import secrets
import tarfile
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from sandtrap.config import DockerSettings, SandboxSettings, parse_size
from sandtrap.sandbox.docker import network
from sandtrap.sandbox.host.systemd_cgroups import RUN_MIN_FOR_SYSTEMD

LABEL_MANAGED = "sandtrap.managed"
LABEL_SENSOR = "sandtrap.sensor"
LABEL_CREATED = "sandtrap.created"
LABEL_SESSION = "sandtrap.session"
LABEL_SRC_IP = "sandtrap.src_ip"
LABEL_ROLE = "sandtrap.role"
LABEL_PERSONA = "sandtrap.persona"

_NAME_SAFE = re.compile(r"[^a-zA-Z0-9_.-]")


# The engine's diff kinds (GET /containers/{id}/changes) as ChangedFile's.
CHANGE_KIND = {0: "C", 1: "A", 2: "D"}


def safe_name(text: str) -> str:
    return _NAME_SAFE.sub("-", text)[:48] or "x"


def box_name(sensor: str, session: str = "") -> str:
    """``sandtrap-<sensor>-s-<session>`` for a session's box, ``sandtrap-<sensor>-w-<random>`` for a warm one."""
    kind = f"s-{safe_name(session)}" if session else f"w-{secrets.token_hex(4)}"
    return f"sandtrap-{safe_name(sensor)}-{kind}"


def box_labels(sensor: str, session: str = "", src_ip: str = "", role: str = "", persona: str = "") -> dict[str, str]:
    """The labels a new box carries: this sensor's, when, and its session, source and persona if known."""
    return {
        **({LABEL_PERSONA: persona} if persona else {}),
        LABEL_MANAGED: "true",
        LABEL_SENSOR: sensor,
        LABEL_CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        LABEL_SESSION: session,
        LABEL_SRC_IP: src_ip,
        LABEL_ROLE: role or ("session" if session else "warm"),
    }


# cgroup v1's named systemd hierarchy: at a cgroup namespace's root it has no release_agent (a container tell).
SYSTEMD_CGROUP = "/sys/fs/cgroup/systemd"


def writable_mount(path: str, size: int) -> dict[str, Any]:
    options = {"type": "tmpfs", "device": "tmpfs", "o": f"size={size}"}
    return {"Type": "volume", "Target": path, "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": options}}}


# Files the engine bind-mounts into /etc itself: never seeded over.
ENGINE_FILES = {"etc/hostname", "etc/hosts", "etc/resolv.conf"}


def seed_archive(parts: Mapping[str, tarfile.TarFile]) -> tuple[bytes, str]:
    """One tar, rooted at /, of what the image holds under each writable path (the engine's archives are
    rooted at the path's last component), and the shell lines that give each mount point the image's
    owner and mode (a fresh tmpfs is 1777 root)."""
    buf = io.BytesIO()
    fix = []
    with tarfile.open(fileobj=buf, mode="w") as out:
        for path, tar in parts.items():
            parent = path.rsplit("/", 1)[0].lstrip("/")
            for member in tar.getmembers():
                if member.name == path.rsplit("/", 1)[1] and member.isdir():
                    fix.append(f"chown {member.uid}:{member.gid} {path} && chmod {member.mode & 0o7777:o} {path}")
                member.name = f"{parent}/{member.name}".lstrip("/")
                if member.islnk():
                    member.linkname = f"{parent}/{member.linkname}".lstrip("/")
                if member.name in ENGINE_FILES:
                    continue
                out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    return buf.getvalue(), " && ".join(fix) or "true"


def create_config(
    d: DockerSettings,
    s: SandboxSettings,
    labels: Mapping[str, str],
    seccomp: str | None,
    cgroup_parent: str = "",
    cpuset: str = "",
    mask_systemd_cgroup: bool = False,
    systemd: bool = False,
    proc_binds: list[str] | None = None,
) -> dict[str, Any]:
    """The container's create body: every hardening item in one place (see README, Hardening). ``d`` is
    ``sandbox.docker``; ``s`` is ``sandbox``, read for what every backend has (name, limits, network, init).

    ``seccomp`` is the profile's JSON text (``seccomp.resolve``), None for the engine's own default. With a
    ``cgroup_parent`` (see :mod:`sandtrap.sandbox.host.cgroups`) the memory, CPU and pids limits are already on
    that parent and the container gets none of its own; ``cpuset`` pins it to those CPUs.
    ``mask_systemd_cgroup``: a small tmpfs over /sys/fs/cgroup/systemd, given the root's files by init.
    ``systemd``: init becomes systemd once the host has handed the box its cgroups (``sandbox.init``,
    :mod:`sandtrap.sandbox.host.systemd_cgroups`): CAP_SETPCAP (units shrink their own bounding set), /run/lock
    as Debian mounts it, and systemd's stop signal. ``proc_binds``: the read-only /proc views
    (:class:`~sandtrap.sandbox.host.procviews.ProcViews`)."""
    security = []
    if d.no_new_privileges:
        security.append("no-new-privileges:true")
    if seccomp is not None:
        security.append("seccomp=" + seccomp)
    internal = s.network == "internal"
    host: dict[str, Any] = {
        "NetworkMode": d.network_name if internal else "none",
        "Memory": s.memory,
        "MemorySwap": s.memory_swap or s.memory,
        "NanoCpus": int(s.cpus * 1e9),
        "PidsLimit": s.pids_limit,
        "CapDrop": ["ALL"],
        "CapAdd": [*d.cap_add, *(["SETPCAP"] if systemd and "SETPCAP" not in d.cap_add else [])],
        "SecurityOpt": security,
        "Privileged": False,
        "ReadonlyRootfs": d.read_only_root,
        "Tmpfs": dict(d.tmpfs),
        "Ulimits": [
            {"Name": "nofile", "Soft": d.ulimit_nofile, "Hard": d.ulimit_nofile_hard},
            {"Name": "nproc", "Soft": d.ulimit_nproc, "Hard": d.ulimit_nproc},
        ],
        "IpcMode": "private",
        "ShmSize": 64 * 1024 * 1024,
        "OomScoreAdj": 500,
        "Init": False,
        "AutoRemove": False,
        "RestartPolicy": {"Name": "no"},
        "LogConfig": {"Type": "none", "Config": {}},
        "Binds": list(proc_binds or []),
        "Mounts": [],
        "CgroupnsMode": d.cgroupns,
        "Devices": [],
    }
    if cgroup_parent:
        for key in ("Memory", "MemorySwap", "NanoCpus", "PidsLimit"):
            del host[key]
        host["CgroupParent"] = cgroup_parent
    if cpuset:
        host["CpusetCpus"] = cpuset
    if mask_systemd_cgroup:
        host["Tmpfs"][SYSTEMD_CGROUP] = "rw,nosuid,nodev,noexec,size=16k,nr_inodes=64,mode=755"
    if systemd:
        host["Tmpfs"]["/run/lock"] = "rw,nosuid,nodev,noexec,size=5m"
        if "/run" in host["Tmpfs"]:
            host["Tmpfs"]["/run"] = run_for_systemd(host["Tmpfs"]["/run"], s.memory)
    if d.read_only_root:
        # The places people write, each a size-limited tmpfs (as a local volume, so the engine's archive API
        # sees into it), seeded from the image by DockerBackend.create. A tmpfs page is charged to the box's
        # memory cgroup: the sum of all writes is bounded by `memory` too, and nothing reaches the host's disk.
        host["Mounts"] = [writable_mount(path, size) for path, size in d.writable.items()]
    if internal:
        # The embedded DNS server's only upstream is the gateway, which drops it (see network.py).
        host["Dns"] = [network.gateway(s.network_subnet)]
    if d.runtime:
        host["Runtime"] = d.runtime
    return {
        "Image": d.image,
        "Hostname": s.hostname,
        "Domainname": s.domain,
        "Labels": dict(labels),
        "Tty": False,
        "OpenStdin": False,
        "AttachStdin": False,
        "AttachStdout": False,
        "AttachStderr": False,
        "StopSignal": "SIGRTMIN+3" if systemd else "SIGTERM",  # what systemd takes as "halt" (its container interface)
        "NetworkDisabled": not internal,
        "HostConfig": host,
        **({"Cmd": ["/sbin/init", "--systemd"]} if systemd else {}),
    }


def run_for_systemd(options: str, memory: int) -> str:
    """The /run tmpfs options with a size systemd can reload in: 20% of ``memory``, at least 48 MiB (a larger
    size given in ``options`` is kept)."""
    want = max(RUN_MIN_FOR_SYSTEMD, memory // 5)
    parts = [o for o in options.split(",") if o]
    sizes = [o for o in parts if o.startswith("size=")]
    try:
        have = parse_size(sizes[-1].removeprefix("size=")) if sizes else 0
    except ValueError:
        have = 0
    if have >= want:
        return options
    return ",".join([*(o for o in parts if not o.startswith("size=")), f"size={want // 1024}k"])


def files_archive(files: Mapping[str, tuple[bytes, int, float]]) -> bytes:
    """A tar rooted at / of regular files owned by root: relative path -> (content, mode, mtime)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, (data, mode, mtime) in sorted(files.items()):
            if name.startswith("/") or ".." in name.split("/"):
                raise ValueError(f"not a relative path inside the box: {name!r}")
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(data), mode, int(mtime)
            tar.addfile(member, io.BytesIO(data))
    return buf.getvalue()
