"""``sandbox``: what every backend has, and one section per backend with what only that backend has."""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sandtrap.config.engine import REMOTE_DISK_QUOTA, EngineSettings, tcp_host
from sandtrap.config.values import ByteSize, Section, box_subnet, parse_size

# The backends sandbox.backend may name that this version builds (app.BACKENDS); the Literal also names the planned.
AVAILABLE_BACKENDS = ("docker", "microvm", "nspawn")


class DockerSettings(EngineSettings):
    """``sandbox.docker``: what only the Docker backend has (an engine, its image, a container's create body)."""

    image: str = Field("sandtrap-target:latest", description="the engine's tag of the box image (`sandtrap build`)")
    network_name: str = Field(
        "sandtrap-internal", description="with sandbox.network: internal: the engine network's name"
    )
    # Hardening (each item documented in README "Hardening").
    cap_add: list[str] = Field(
        default_factory=lambda: [
            "CHOWN",
            "DAC_OVERRIDE",
            "FOWNER",
            "FSETID",
            "KILL",
            "SETGID",
            "SETUID",
            "AUDIT_WRITE",
            "NET_BIND_SERVICE",  # sshd in the box listens on port 22 (its own network namespace)
            "SYS_CHROOT",  # ...and chroots its pre-auth child to /run/sshd (without it every connection dies)
        ]
    )
    no_new_privileges: bool = Field(
        False,
        description="true: setuid binaries cannot raise privileges (sudo then fails for users, a tell); inside "
        "the box that only keeps a user from the box's root, which any attacker can log in as",
    )
    seccomp_profile: str = Field(
        "sandtrap",
        description="'sandtrap' (Docker's default rules with io_uring refused, <data_dir>/seccomp/sandtrap.json, "
        "made by `make setup`), 'default' (the engine's own) or a path to a JSON profile",
    )
    read_only_root: bool = False
    writable: dict[str, ByteSize] = Field(
        default_factory=lambda: {
            "/etc": parse_size("16m"),
            "/root": parse_size("64m"),
            "/home": parse_size("64m"),
            "/var": parse_size("128m"),
            "/opt": parse_size("32m"),
            "/srv": parse_size("8m"),
            "/usr/local": parse_size("32m"),
        },
        description="with read_only_root: the places left writable, each a tmpfs of this size seeded from the "
        "image; every byte written there is charged to the box's memory",
    )
    tmpfs: dict[str, str] = Field(
        default_factory=lambda: {"/tmp": "rw,exec,nosuid,nodev,size=64m", "/run": "rw,nosuid,nodev,size=16m"}
    )
    disk_quota: ByteSize = Field(
        parse_size("256m"),
        description="each box's writable layer (the engine's overlay upper dir, measured from this host) may hold "
        "this much; past it the box is frozen, its connections end (sandtrap.limit.hit disk_quota) and it is stopped, "
        "kept for forensics. Nothing shows in the box's df or mount. 0 = off (overlay2 on ext4 has no other bound)",
    )
    disk_files_max: int = Field(
        200000, ge=1000, description="entries a box's writable layer may hold (also bounds the cost of a measure)"
    )
    disk_check_s: float = Field(
        0.25,
        gt=0,
        le=60,
        description="how often a box at rest is measured (a growing one sooner, down to 0.05 s; one of many files "
        "less often): a writer gets about this long at full speed before the first look",
    )
    ulimit_nofile: int = Field(1024, ge=16, description="open files: the soft limit every process starts with")
    ulimit_nofile_hard: int = Field(
        524288,
        ge=16,
        le=1048576,
        description="open files: the hard limit a process may raise its soft limit to (systemd's default); "
        "every descriptor is still charged to the box's memory cgroup",
    )
    ulimit_nproc: int = Field(512, ge=8)
    runtime: str = Field("", description="alternative OCI runtime, e.g. runsc; empty = engine default")
    # Realism (README "Realism"): what gives a container away, removed where the security cost is nil.
    cgroupns: Literal["private", "host"] = Field("private", description="private: /proc/self/cgroup shows '/'")
    limits_in_parent: bool = Field(
        True,
        description="memory/pids/CPU limits on a per-box parent cgroup, so the box's own (namespace root) cgroup "
        "reads unlimited as a real machine's does; needs cgroup v1 with the cgroupfs driver and the honeypot as "
        "root on the engine's host, else the limits stay on the container",
    )
    pin_cpus: bool = Field(
        True,
        description="pin each box to ceil(sandbox.cpus) CPUs, so nproc and /proc/cpuinfo count what its CPU quota "
        "gives",
    )
    mask_cgroupns: bool = Field(
        True,
        description="cgroup v1: a small tmpfs with the root's file names over /sys/fs/cgroup/systemd, whose "
        "namespace root lacks release_agent (how systemd-detect-virt spots a container)",
    )

    @field_validator("network_name")
    @classmethod
    def _network_name(cls, v: str) -> str:
        if not re.fullmatch(r"[a-zA-Z0-9][a-zA-Z0-9_.-]{0,62}", v):
            raise ValueError("must be a Docker network name (letters, digits, '_', '.', '-'), e.g. sandtrap-internal")
        return v

    @field_validator("writable")
    @classmethod
    def _writable(cls, v: dict[str, int]) -> dict[str, int]:
        for path, size in v.items():
            if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", path) or {".", ".."} & set(path.split("/")):
                raise ValueError(f"{path!r} is not an absolute directory such as /var")
            if size < 1024 * 1024:
                raise ValueError(f"{path}: a size below 1m leaves no room for the image's files")
        return v

    @field_validator("disk_quota")
    @classmethod
    def _disk_quota(cls, v: int) -> int:
        if v and v < 16 * 1024 * 1024:
            raise ValueError("must be 0 (off) or at least 16m (a login writes its logs and history); e.g. 256m")
        return v

    @field_validator("cap_add")
    @classmethod
    def _caps(cls, v: list[str]) -> list[str]:
        out = []
        for cap in v:
            name = cap.upper().removeprefix("CAP_")
            if not re.fullmatch(r"[A-Z_]+", name):
                raise ValueError(f"{cap!r} is not a capability name such as CHOWN or SETUID")
            if name in {"SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "SYS_PTRACE", "SYS_BOOT", "ALL"}:
                raise ValueError(f"{name} would let an attacker escape the sandbox; remove it")
            out.append(name)
        return out

    @model_validator(mode="after")
    def _nofile(self) -> DockerSettings:
        if self.ulimit_nofile_hard < self.ulimit_nofile:
            raise ValueError("sandbox.docker.ulimit_nofile_hard must be at least sandbox.docker.ulimit_nofile")
        return self


class LureSettings(Section):
    """``sandbox.microvm.lure``: the lure file system shared read-only into each VM over virtio-fs (README
    "Micro-VMs"); every open and read in it is an event of the VM's session."""

    enabled: bool = Field(True, description="false: no lure file system (and no honeytoken reads seen in VMs)")
    path: str = Field("/opt/proprietary_data", description="where the guest mounts it")
    source: str = Field(
        "", description="a host directory served as the lure tree (read at each VM's start); '' generates a "
        "plausible file share, different in every VM",
    )  # fmt: skip
    max_bytes: ByteSize = Field(parse_size("16m"), description="the tree's files together, at most (kept in memory)")
    events_per_s: float = Field(
        20.0, gt=0, le=10_000, description="lure events of one VM a second on average; beyond, counted as suppressed"
    )
    events_burst: int = Field(200, ge=1, le=100_000, description="lure events of one VM at once before the rate holds")
    virtiofsd: str = Field("/usr/lib/qemu/virtiofsd", description="QEMU's virtiofsd (Debian: qemu-system-common)")

    @field_validator("path")
    @classmethod
    def _path(cls, v: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9_.-]+)+", v) or {".", ".."} & set(v.split("/")):
            raise ValueError(f"{v!r} is not an absolute directory such as /opt/proprietary_data")
        if v.split("/")[1] in {"proc", "sys", "dev", "run", "etc", "bin", "sbin", "lib", "lib64", "usr", "boot"}:
            raise ValueError(f"{v} would hide a system directory of the guest; use one under /opt, /srv or /mnt")
        return v

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if v and not os.path.isdir(v):
            raise ValueError(f"{v} is not a directory on this host; set '' for a generated tree")
        return v

    @field_validator("max_bytes")
    @classmethod
    def _max_bytes(cls, v: int) -> int:
        if not 4096 <= v <= 1024 * 1024 * 1024:
            raise ValueError("must be between 4k and 1g; e.g. 16m")
        return v


class MicroVMSettings(Section):
    """``sandbox.microvm``: what only the QEMU micro-VM backend has (README "Micro-VMs")."""

    qemu: str = Field("qemu-system-x86_64", description="the QEMU system emulator (Debian: qemu-system-x86)")
    run_as: str = Field(
        "sandtrap-qemu",
        description="the unprivileged user QEMU becomes once its tap, disk and sockets are open (-runas; made by "
        "scripts/setup.sh); '' keeps QEMU root (with its syscall filter, but root)",
    )
    accel: Literal["auto", "kvm", "tcg"] = Field(
        "auto",
        description="auto: KVM where a probe shows it works (/dev/kvm opens and the CPU has vmx or svm), else TCG "
        "(software emulation, much slower) with a warning; kvm: refuse to start without it; tcg: always emulate",
    )
    memory: ByteSize = Field(
        parse_size("512m"),
        description="each VM's RAM, fixed (its kernel and page cache included: sandbox.memory is a container's limit)",
    )
    vcpus: int = Field(1, ge=1, le=16, description="each VM's virtual CPUs, fixed")
    disk_size: ByteSize = Field(
        parse_size("4g"),
        description="the guest's disk (the base image's size; each VM's overlay can grow to it and no further)",
    )
    boot_timeout_s: float = Field(
        300.0, gt=0, description="from QEMU's start to the guest's sshd answering (TCG boots in tens of seconds)"
    )
    kernel_cmdline_extra: str = Field(
        "", description="appended to the guest kernel's command line (the guest can read it in /proc/cmdline)"
    )
    tcg_cache: ByteSize = Field(
        parse_size("128m"),
        description="under TCG: each VM's translated-code cache (QEMU's own default, 1 GiB, is most of an idle VM's "
        "resident memory); smaller saves memory, costs retranslation",
    )
    console_log_max: ByteSize = Field(
        parse_size("1m"), description="each VM's serial console log stops growing at this size (the rest is dropped)"
    )
    lure: LureSettings = Field(default_factory=LureSettings)
    snapshot: bool = Field(
        True,
        description="refill from a saved snapshot of a booted template VM (made once per image and QEMU command "
        "line, then each VM made unique) instead of a cold boot; false: every VM boots",
    )
    memory_overhead: ByteSize = Field(
        parse_size("256m"),
        description="QEMU's own memory beyond the guest's RAM and TCG cache; each VM's cgroup holds QEMU to memory + "
        "tcg_cache (under TCG) + this, and the kernel kills a QEMU past it (the session ends, recorded)",
    )
    pids_max: int = Field(64, ge=16, le=4096, description="threads one QEMU may have (its cgroup's pids.max)")
    chroot: bool = Field(
        True,
        description="QEMU chroots into an empty directory once its disk, kernel, tap and sockets are open (-chroot): "
        "it can open no host file by name after that",
    )
    unresponsive_s: float = Field(
        20.0,
        ge=5.0,
        le=600.0,
        description="a VM whose QEMU monitor has not answered for this long (a stopped or wedged QEMU) is killed and "
        "its session ended, recorded as sandbox_failed",
    )

    @field_validator("kernel_cmdline_extra")
    @classmethod
    def _cmdline(cls, v: str) -> str:
        if any(c in v for c in "\n\r\0,") or len(v) > 512:
            raise ValueError(
                "must be one line of space-separated kernel parameters without ',' (e.g. 'mitigations=off')"
            )
        return v

    @field_validator("run_as")
    @classmethod
    def _run_as(cls, v: str) -> str:
        if v and not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", v):
            raise ValueError("must be a user name such as sandtrap-qemu (or '' for root)")
        if v == "root":
            raise ValueError("QEMU as root is '' (and not advised); use an unprivileged user such as sandtrap-qemu")
        return v

    @field_validator("tcg_cache")
    @classmethod
    def _tcg_cache(cls, v: int) -> int:
        if not 16 * 1024 * 1024 <= v <= 4 * 1024 * 1024 * 1024:
            raise ValueError("must be between 16m and 4g; e.g. 128m")
        return v

    @field_validator("memory")
    @classmethod
    def _memory(cls, v: int) -> int:
        if v < 128 * 1024 * 1024:
            raise ValueError("Debian's kernel and systemd need at least 128m; e.g. 512m")
        return v

    @field_validator("disk_size")
    @classmethod
    def _disk(cls, v: int) -> int:
        if v < 2 * 1024 * 1024 * 1024:
            raise ValueError("the image (kernel included) needs at least 2g; e.g. 4g")
        return v


class NspawnSettings(Section):
    """``sandbox.nspawn``: what only the systemd-nspawn backend has (README "nspawn boxes")."""

    nspawn: str = Field(
        "systemd-nspawn", description="the systemd-nspawn program (Debian: apt-get install systemd-container)"
    )
    disk_size: ByteSize = Field(
        parse_size("512m"),
        description="each box's writable layer (the overlay's upper directory) is a tmpfs of this size: what a box "
        "writes, /tmp included, can grow to it and no further; its pages are charged to the box's memory while it "
        "runs, and it is kept (in memory) after the stop for forensics until the box is removed",
    )
    cap_add: list[str] = Field(
        default_factory=lambda: list(DockerSettings.model_fields["cap_add"].get_default(call_default_factory=True)),
        description="the only capabilities a box keeps (every other one is dropped): Docker's list by default",
    )
    no_new_privileges: bool = Field(False, description="as sandbox.docker.no_new_privileges")

    @field_validator("cap_add")
    @classmethod
    def _caps(cls, v: list[str]) -> list[str]:
        out = []
        for cap in v:
            name = cap.upper().removeprefix("CAP_")
            if not re.fullmatch(r"[A-Z_]{2,32}", name):
                raise ValueError(f"{cap!r} is not a capability name; e.g. CHOWN or CAP_CHOWN")
            if name in {"SYS_ADMIN", "SYS_MODULE", "SYS_RAWIO", "SYS_PTRACE", "SYS_BOOT", "MAC_ADMIN", "BPF"}:
                raise ValueError(f"{name} would let a box reach the host; leave it out")
            out.append(name)
        return out

    @field_validator("disk_size")
    @classmethod
    def _disk(cls, v: int) -> int:
        if not 16 * 1024 * 1024 <= v <= 64 * 1024 * 1024 * 1024:
            raise ValueError("must be between 16m and 64g; e.g. 512m")
        return v


# Keys of the flat ``sandbox`` section of earlier versions that now sit in ``sandbox.docker``.
MOVED_KEYS = {f"sandbox.{key}": f"sandbox.docker.{key}" for key in DockerSettings.model_fields}


class SandboxSettings(Section):
    """``sandbox``: what every backend has (the pool, the box's name and limits, how logins reach it), and one
    section per backend with what only that backend has; ``backend`` picks the one used."""

    backend: Literal["docker", "microvm", "nspawn"] = Field(
        "docker",
        description="docker, microvm (a QEMU VM per box: sandbox.microvm) or nspawn (systemd-nspawn: sandbox.nspawn)",
    )
    # The pool and who gets which box.
    pool_size: int = Field(16, ge=0, le=1000, description="warm boxes kept ready at least (microvm: 3 unless set)")
    pool_max: int = Field(
        20,
        ge=0,
        le=1000,
        description="warm boxes at most: the pool grows toward it when logins arrive faster than boxes warm, "
        "and shrinks back to pool_size when they stop (also bounded by max_sandboxes and the host's MemAvailable)",
    )
    pool_refill_parallel: int = Field(4, ge=1, le=64, description="boxes warmed at once")
    pool_shrink_after_s: float = Field(
        120.0, gt=0, description="the pool keeps its grown size this long after arrivals slow, then shrinks"
    )
    max_sandboxes: int = Field(50, ge=1, description="global cap on live (running) sandboxes")
    affinity: Literal["session", "source_ip"] = Field(
        "source_ip",
        description="source_ip: one box per client address (concurrent and later connections share it, as a "
        "bot that uploads in one connection and runs in the next expects); session: a fresh box per connection",
    )
    ip_ttl_s: float = Field(1800.0, gt=0, description="source_ip: a box outlives its last connection by this long")
    ip_max_lifetime_s: float = Field(
        21600.0,
        gt=0,
        description="source_ip: a box older than this takes no new connection (the next gets a fresh box); it goes "
        "back when its last connection ends",
    )
    # Forensics retention of released (stopped) sandboxes.
    retention_keep: int = Field(20, ge=0, description="keep at most K stopped sandboxes")
    retention_hours: float = Field(72.0, ge=0, description="remove stopped sandboxes older than this")
    # The box: its name and the limits every backend enforces.
    hostname: str = "web-prod-03"
    domain: str = "corp.internal"
    memory: ByteSize = parse_size("256m")
    memory_swap: ByteSize = Field(0, description="0 = same as memory (no swap)")
    cpus: float = Field(0.5, gt=0, le=64)
    pids_limit: int = Field(128, ge=8)
    start_timeout_s: float = Field(30.0, gt=0)
    # The box's network: set from the top-level `network` section (mode, subnet), never written here.
    network: Literal["none", "internal", "capture"] = Field(
        "none", exclude=True, description="network.mode (set from the top-level network section)"
    )
    network_subnet: str = Field(
        "10.20.1.0/24", exclude=True, description="network.subnet (set from the top-level network section)"
    )
    telnet_in_box: bool = Field(
        False, exclude=True, description="a telnet service is configured (set from services): boxes run inetd on :23"
    )
    # How the box boots and how a login reaches it.
    init: Literal["sandtrap", "systemd"] = Field(
        "sandtrap",
        description="the box's PID 1: sandtrap = our small init starts rsyslog, cron, nginx and the listener; systemd "
        "= it does the same boot work, then the host gives the box its own name=systemd cgroups and it becomes "
        "/lib/systemd/systemd, which starts them as units (the listener as ssh.service) and answers systemctl "
        "(adds CAP_SETPCAP; needs cgroup v1, and on Docker a private cgroup namespace, mask_cgroupns and the "
        "honeypot as root on the engine's host, else boxes keep sandtrap's init; docker and nspawn)",
    )
    session_transport: Literal["exec", "init"] = Field(
        "init",
        description="how a login's processes start: exec = by the backend (`docker exec`: parent pid 0 in the box); "
        "init = the box's sshd-titled listener (forked by its PID 1) starts them and hands their pty or pipes to the "
        "honeypot (needs the honeypot as root on the engine's host; any failure falls back to exec)",
    )
    connection_in_box: bool = Field(
        True,
        description="with session_transport init: each login's TCP connection shows in the box (`ss -tnp`: :22, "
        "the client's address and port, held by sshd): the honeypot connects to the box's :22 from the client's "
        "address (inside the box for a loopback client; else, with network internal, by a transparent socket on "
        'the host and three host rules that deliver the replies, README "Network")',
    )
    # What the host lends every box.
    share_host_keys: bool = Field(
        True,
        description="the box's /etc/ssh holds the sensor's host keys, so the key the client saw is the box's own "
        "sshd's (an attacker who is root in the box can read them, as on any server)",
    )
    honeytokens: bool = Field(True, description="plant lure credentials unique to each box; record reads")
    lxcfs_dir: str = Field(
        "/var/lib/lxcfs",
        description="lxcfs mount: /proc/meminfo etc. as the box's limits show them (boxes sharing the host's "
        "kernel); '' = off",
    )
    loadavg_dir: str = Field(
        "/var/lib/sandtrap-loadavg",
        description="mount of `sandtrap loadavgfs`: each box's /proc/loadavg counts its own tasks, load and newest "
        "pid (started by the set-up); '' = off, and when it is not mounted there boxes get lxcfs's loadavg",
    )
    # One section per backend.
    docker: DockerSettings = DockerSettings()
    microvm: MicroVMSettings = MicroVMSettings()
    nspawn: NspawnSettings = NspawnSettings()

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in AVAILABLE_BACKENDS:
            raise ValueError(
                f"the {v} backend is not available yet (planned); this version has only "
                + ", ".join(AVAILABLE_BACKENDS)
                + ": set sandbox.backend: docker"
            )
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str) -> str:
        if not re.fullmatch(r"[a-zA-Z0-9]([a-zA-Z0-9-]{0,61}[a-zA-Z0-9])?", v):
            raise ValueError("must be a single DNS label (letters, digits, '-'), e.g. web-prod-03")
        return v

    @field_validator("lxcfs_dir", "loadavg_dir")
    @classmethod
    def _mount_dir(cls, v: str) -> str:
        if v and (not v.startswith("/") or ":" in v or "," in v or v.rstrip("/") == ""):
            raise ValueError(
                "must be an absolute directory path without ':' or ',' (or '' for off), e.g. /var/lib/sandtrap-loadavg"
            )
        return v.rstrip("/")

    @field_validator("network_subnet")
    @classmethod
    def _network_subnet(cls, v: str) -> str:
        return box_subnet(v)

    @model_validator(mode="before")
    @classmethod
    def _vm_pool(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("backend") == "microvm" and "pool_size" not in data:
            return {**data, "pool_size": 3}
        return data

    @model_validator(mode="after")
    def _pool_max(self) -> SandboxSettings:
        if self.pool_max < self.pool_size:
            raise ValueError(
                f"sandbox.pool_max ({self.pool_max}) must be at least sandbox.pool_size ({self.pool_size}): "
                f"raise pool_max to {self.pool_size} or more"
            )
        return self

    @model_validator(mode="after")
    def _remote_disk(self) -> SandboxSettings:
        d = self.docker
        if self.backend == "docker" and tcp_host(d.docker_host) is not None and d.disk_quota:
            raise ValueError(REMOTE_DISK_QUOTA.format(host=d.docker_host))
        return self

    @model_validator(mode="after")
    def _swap(self) -> SandboxSettings:
        if self.memory_swap and self.memory_swap < self.memory:
            raise ValueError("sandbox.memory_swap must be 0 (no swap) or at least sandbox.memory")
        return self
