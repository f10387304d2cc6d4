"""Docker backend: hardened containers driven through aiodocker (asyncio-native, no threads).

aiodocker over docker-py: every engine call (exec streams included) stays on the SSH event loop
without a thread per stream, and its exec stream has flow control (a bounded queue that pauses the
socket), which gives the bridge back-pressure for free.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import os
import re
import secrets
import signal
import tarfile
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiodocker
from aiodocker.execs import Exec
from aiodocker.stream import Stream

from sandtrap.config import SandboxSettings, parse_size
from sandtrap.errors import SandboxError
from sandtrap.sandbox import broker, engine, hostfs, network, relay, systemd_cgroups
from sandtrap.sandbox.base import (
    ChangedFile,
    Chunk,
    ClientAddress,
    ExitStatus,
    FileData,
    Sandbox,
    SandboxInfo,
    TermSize,
)
from sandtrap.sandbox.cgroups import CgroupError, Limits, ParentCgroups, cpuset_for

log = logging.getLogger(__name__)

LABEL_MANAGED = "sandtrap.managed"
LABEL_SENSOR = "sandtrap.sensor"
LABEL_CREATED = "sandtrap.created"
LABEL_SESSION = "sandtrap.session"
LABEL_SRC_IP = "sandtrap.src_ip"
LABEL_ROLE = "sandtrap.role"

_KIND = {0: "C", 1: "A", 2: "D"}
_NAME_SAFE = re.compile(r"[^a-zA-Z0-9_.-]")


def safe_name(text: str) -> str:
    return _NAME_SAFE.sub("-", text)[:48] or "x"


# /proc files lxcfs renders per container (from its cgroup), bind-mounted read-only over the kernel's.
# /proc/uptime is left out on purpose: a box that booted seconds ago is a tell; the host's uptime is not.
LXCFS_FILES = ("proc/cpuinfo", "proc/meminfo", "proc/stat", "proc/loadavg", "proc/diskstats", "proc/swaps")


def lxcfs_binds(lxcfs_dir: str) -> list[str]:
    """Read-only binds of lxcfs's views, or none when lxcfs is not mounted there."""
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


# sandtrap's own /proc/loadavg (sandbox/loadavgfs.py): the box's tasks, load and newest pid, unlike lxcfs's.
LOADAVG_FILE = "proc/loadavg"
_loadavg_warned: set[str] = set()


def loadavg_bind(loadavg_dir: str) -> str | None:
    """The read-only bind of our loadavg file system's file, or None (then lxcfs's, with a warning) when it
    is off or not served there."""
    if not loadavg_dir:
        return None
    path = Path(loadavg_dir) / LOADAVG_FILE
    try:
        # A read, not a stat: the kernel answers a stat from its cache for a second after the daemon died,
        # while every read goes to the daemon (direct I/O). The host's own figures come back, at once.
        with path.open("rb") as f:
            f.read(256)
        _loadavg_warned.clear()
        return f"{path}:/{LOADAVG_FILE}:ro"
    except FileNotFoundError:
        reason = "nothing is mounted there (the set-up starts `sandtrap loadavgfs`)"
    except OSError as exc:  # a mount whose daemon died: ENOTCONN
        reason = str(exc)
    if reason not in _loadavg_warned:
        _loadavg_warned.add(reason)
        log.warning(
            "sandtrap loadavgfs at %s is not usable (%s): boxes show lxcfs's /proc/loadavg", loadavg_dir, reason
        )
    return None


def proc_binds(lxcfs_dir: str, loadavg_dir: str) -> list[str]:
    """lxcfs's views, with our /proc/loadavg in place of lxcfs's when it is served."""
    binds = lxcfs_binds(lxcfs_dir)
    ours = loadavg_bind(loadavg_dir)
    if ours is None:
        return binds
    return [b for b in binds if b.split(":")[1] != f"/{LOADAVG_FILE}"] + [ours]


# cgroup v1's named systemd hierarchy: at a cgroup namespace's root it has no release_agent (a container tell).
SYSTEMD_CGROUP = "/sys/fs/cgroup/systemd"


def writable_mount(path: str, size: int) -> dict[str, Any]:
    options = {"type": "tmpfs", "device": "tmpfs", "o": f"size={size}"}
    return {"Type": "volume", "Target": path, "VolumeOptions": {"DriverConfig": {"Name": "local", "Options": options}}}


# Files the engine bind-mounts into /etc itself: never seeded over.
_ENGINE_FILES = {"etc/hostname", "etc/hosts", "etc/resolv.conf"}


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
                if member.name in _ENGINE_FILES:
                    continue
                out.addfile(member, tar.extractfile(member) if member.isfile() else None)
    return buf.getvalue(), " && ".join(fix) or "true"


def create_config(
    s: SandboxSettings,
    labels: Mapping[str, str],
    seccomp: str | None,
    cgroup_parent: str = "",
    cpuset: str = "",
    mask_systemd_cgroup: bool = False,
    systemd: bool = False,
) -> dict[str, Any]:
    """The container's create body: every hardening item in one place (see README, Hardening).

    ``seccomp`` is the profile's JSON text (``seccomp.resolve``), None for the engine's own default. With a
    ``cgroup_parent`` (see :mod:`sandtrap.sandbox.cgroups`) the memory, CPU and pids limits are already on
    that parent and the container gets none of its own; ``cpuset`` pins it to those CPUs.
    ``mask_systemd_cgroup``: a small tmpfs over /sys/fs/cgroup/systemd, given the root's files by init.
    ``systemd``: init becomes systemd once the host has handed the box its cgroups (``sandbox.init``,
    :mod:`sandtrap.sandbox.systemd_cgroups`): CAP_SETPCAP (units shrink their own bounding set), /run/lock as
    Debian mounts it, and systemd's stop signal."""
    security = []
    if s.no_new_privileges:
        security.append("no-new-privileges:true")
    if seccomp is not None:
        security.append("seccomp=" + seccomp)
    internal = s.network == "internal"
    host: dict[str, Any] = {
        "NetworkMode": s.network_name if internal else "none",
        "Memory": s.memory,
        "MemorySwap": s.memory_swap or s.memory,
        "NanoCpus": int(s.cpus * 1e9),
        "PidsLimit": s.pids_limit,
        "CapDrop": ["ALL"],
        "CapAdd": [*s.cap_add, *(["SETPCAP"] if systemd and "SETPCAP" not in s.cap_add else [])],
        "SecurityOpt": security,
        "Privileged": False,
        "ReadonlyRootfs": s.read_only_root,
        "Tmpfs": dict(s.tmpfs),
        "Ulimits": [
            {"Name": "nofile", "Soft": s.ulimit_nofile, "Hard": s.ulimit_nofile_hard},
            {"Name": "nproc", "Soft": s.ulimit_nproc, "Hard": s.ulimit_nproc},
        ],
        "IpcMode": "private",
        "ShmSize": 64 * 1024 * 1024,
        "OomScoreAdj": 500,
        "Init": False,
        "AutoRemove": False,
        "RestartPolicy": {"Name": "no"},
        "LogConfig": {"Type": "none", "Config": {}},
        "Binds": proc_binds(s.lxcfs_dir, s.loadavg_dir),
        "Mounts": [],
        "CgroupnsMode": s.cgroupns,
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
    if s.read_only_root:
        # The places people write, each a size-limited tmpfs (as a local volume, so the engine's archive API
        # sees into it), seeded from the image by DockerBackend.create. A tmpfs page is charged to the box's
        # memory cgroup: the sum of all writes is bounded by `memory` too, and nothing reaches the host's disk.
        host["Mounts"] = [writable_mount(path, size) for path, size in s.writable.items()]
    if internal:
        # The embedded DNS server's only upstream is the gateway, which drops it (see network.py).
        host["Dns"] = [network.gateway(s.network_subnet)]
    if s.runtime:
        host["Runtime"] = s.runtime
    return {
        "Image": s.image,
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


# systemd refuses `daemon-reload` unless 16 MiB of /run stay free (its safety buffer); Debian mounts /run with
# 20% of the RAM. A tmpfs's size only caps it: pages are charged to the box's memory as they are written.
RUN_MIN_FOR_SYSTEMD = 48 * 1024 * 1024


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


class DockerProcess:
    """A ``docker exec`` with its hijacked stream; output is bounded by aiodocker's flow-control queue."""

    def __init__(self, execution: Exec, stream: Stream, tty: bool) -> None:
        self._exec = execution
        self._stream = stream
        self._tty = tty
        self._stdin_closed = False
        self._status: ExitStatus | None = None

    async def read(self) -> Chunk | None:
        try:
            msg = await self._stream.read_out()
        except (aiodocker.DockerError, OSError) as exc:
            log.debug("exec stream read ended: %r", exc)
            return None
        if msg is None:
            return None
        return Chunk(msg.stream, msg.data)

    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            return
        try:
            await self._stream.write_in(data)
        except (RuntimeError, OSError, AssertionError) as exc:
            raise SandboxError(f"write to process stdin failed: {exc}") from exc

    async def close_stdin(self) -> None:
        """Half-close the hijacked connection: the engine turns it into EOF on the process's stdin."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        resp = self._stream._resp  # aiodocker keeps no public half-close; this is its own transport
        conn = resp.connection if resp is not None else None
        transport = conn.transport if conn is not None else None
        if transport is not None and transport.can_write_eof():
            transport.write_eof()

    async def resize(self, size: TermSize) -> None:
        if not self._tty:
            return
        try:
            await engine.call("exec resize", self._exec.resize(h=size.rows, w=size.cols), 10)
        except SandboxError as exc:
            log.debug("resize ignored: %s", exc)

    async def wait(self) -> ExitStatus:
        if self._status is not None:
            return self._status
        deadline = time.monotonic() + 10.0
        delay = 0.005
        try:
            while True:
                info = await engine.call("exec inspect", self._exec.inspect(), 10)
                if not info.get("Running") or time.monotonic() > deadline:
                    break
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.2)
        finally:  # the stream is closed even when the engine is gone (an unclosed one warns when collected)
            await self._close()
        code = info.get("ExitCode")
        self._status = exit_status(code if isinstance(code, int) else 255)
        return self._status

    async def kill(self) -> None:
        await self._close()

    def __del__(self) -> None:
        # A process dropped without wait() or kill() (its task cancelled at shutdown, an error half-way):
        # release its engine connection now rather than leave aiodocker to warn when it is collected.
        stream = getattr(self, "_stream", None)
        resp = getattr(stream, "_resp", None)
        if stream is not None and resp is not None and not stream._closed:
            stream._closed = True
            with contextlib.suppress(Exception):
                resp.close()

    async def _close(self) -> None:
        try:
            await self._stream.close()
        except Exception as exc:  # closing a broken stream must never break a session
            log.debug("exec stream close: %r", exc)


def parse_docker_time(text: str) -> datetime | None:
    """Docker's RFC 3339 times carry nanoseconds; Python takes microseconds."""
    if not text or text.startswith("0001"):
        return None
    m = re.match(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)$", text)
    if not m:
        return None
    frac = (m.group(2) or ".0")[:7]
    tz = "+00:00" if m.group(3) == "Z" else m.group(3)
    return datetime.fromisoformat(m.group(1) + frac + tz)


def exit_status(code: int) -> ExitStatus:
    """Docker reports a process killed by signal N as 128+N; SSH wants the signal's name."""
    if 128 < code < 128 + 32:
        try:
            name = signal.Signals(code - 128).name.removeprefix("SIG")
        except ValueError:
            return ExitStatus(code)
        if name in {"KILL", "TERM", "HUP", "INT", "QUIT", "SEGV", "ABRT", "PIPE", "ALRM", "USR1", "USR2", "ILL", "FPE"}:
            return ExitStatus(code, name)
    return ExitStatus(code)


@dataclass(frozen=True)
class HostView:
    """Where a running box's files are on this host (see :mod:`sandtrap.sandbox.hostfs`)."""

    pid: int
    mnt_ns: int  # the inode of pid 1's mount namespace: proves the pid was not reused
    upper: str
    lowers: list[str]
    tmpfs: list[str]
    volumes: list[str]
    address: str = ""  # its eth0's IPv4 address (sandbox.network: internal), '' = none

    @property
    def root(self) -> str:
        return f"/proc/{self.pid}/root"

    def verify(self) -> bool:
        try:
            return Path(f"/proc/{self.pid}/ns/mnt").stat().st_ino == self.mnt_ns
        except OSError:
            return False

    @classmethod
    def from_inspect(cls, info: Mapping[str, Any]) -> HostView | None:
        """None when the box is not running or its files are not on this host (a remote engine)."""
        state = info.get("State") or {}
        pid = int(state.get("Pid") or 0)
        data = (info.get("GraphDriver") or {}).get("Data") or {}
        if not state.get("Running") or pid <= 0 or not data.get("UpperDir"):
            return None
        try:
            mnt_ns = Path(f"/proc/{pid}/ns/mnt").stat().st_ino
        except OSError:
            return None
        return cls(
            pid=pid,
            mnt_ns=mnt_ns,
            upper=str(data["UpperDir"]),
            lowers=[p for p in str(data.get("LowerDir") or "").split(":") if p],
            tmpfs=sorted((info.get("HostConfig") or {}).get("Tmpfs") or {}),
            volumes=sorted(m["Destination"] for m in info.get("Mounts") or [] if m.get("Type") == "volume"),
            address=next(
                (
                    str(n.get("IPAddress"))
                    for n in ((info.get("NetworkSettings") or {}).get("Networks") or {}).values()
                    if isinstance(n, Mapping) and n.get("IPAddress")
                ),
                "",
            ),
        )


class DockerSandbox:
    def __init__(self, client: aiodocker.Docker, container_id: str, name: str, tmpfs: tuple[str, ...] = ()) -> None:
        self._client = client
        self.id = container_id
        self.name = name
        self._tmpfs = tmpfs  # the engine's archive API cannot see into these mounts
        self.seeded_at: float | None = None  # when DockerBackend filled the writable mounts (read_only_root)
        self._host: HostView | None = None
        self._host_checked = False
        self.cgroup = ""  # the name of its parent cgroup, when the backend made one (limits_in_parent)
        self.parents: ParentCgroups | None = None
        # Why logins are not started by the box's listener (sandbox.session_transport: init), '' = they are.
        self.init_refused = "session_transport is exec"
        # A login's TCP connection shown in the box (sandbox.connection_in_box, see relay.py); why a client off
        # loopback cannot have it ('' = it can: the host's rules for the transparent socket are in place).
        self.connection_in_box = False
        self.transparent_refused = "sandbox.network is none"

    async def _host_view(self) -> HostView | None:
        """The box's files on this host, looked up once (None: use the engine)."""
        if not self._host_checked:
            try:
                info = await engine.call("inspect", self._container().show(), 10)
            except SandboxError:
                return None
            self._host, self._host_checked = HostView.from_inspect(info), True
        return self._host

    def _container(self) -> aiodocker.containers.DockerContainer:
        return self._client.containers.container(self.id)

    async def exec(
        self,
        argv: list[str],
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: bool = False,
        client: ClientAddress | None = None,
    ) -> DockerProcess | broker.BrokerProcess:
        if login and not self.init_refused:
            started = await self._start_by_init(argv, tty, env, user, workdir, client)
            if started is not None:
                return started
        container = self._container()
        execution = await engine.call(
            "exec create",
            container.exec(
                cmd=argv,
                stdout=True,
                stderr=True,
                stdin=True,
                tty=tty is not None,
                environment=dict(env) if env else None,
                user=user,
                workdir=workdir,
            ),
        )
        stream = execution.start(detach=False)
        try:
            await engine.call("exec start", stream._init())
        except BaseException:
            await stream.close()
            raise
        proc = DockerProcess(execution, stream, tty is not None)
        _OPEN.setdefault(id(self._client), weakref.WeakSet()).add(proc)
        if tty is not None:
            await proc.resize(tty)
        return proc

    async def _start_by_init(
        self,
        argv: list[str],
        tty: TermSize | None,
        env: Mapping[str, str] | None,
        user: str,
        workdir: str | None,
        client: ClientAddress | None = None,
    ) -> broker.BrokerProcess | None:
        """The process started by the box's listener (see :mod:`sandtrap.sandbox.broker`), or None (logged) when
        it cannot be: the caller then uses ``docker exec``, so a session never fails because of this path."""
        view = await self._host_view()
        if view is not None and not view.verify():  # the box restarted: its pid 1 is another process now
            self._host_checked = False
            view = await self._host_view()
        if view is None:
            log.warning("login in %s by docker exec: the box's pid 1 is not visible on this host", self.name)
            return None
        plan: relay.RelayPlan | None = None
        if client is not None and self.connection_in_box:
            planned = relay.plan(client, view.address, self.transparent_refused)
            if isinstance(planned, str):
                relay.note(planned)
            else:
                plan = planned
        try:
            return await broker.start(view.pid, view.verify, argv, env or {}, user, workdir or "", tty, plan)
        except broker.BrokerError as exc:
            log.warning("login in %s by docker exec: the box's listener failed (%s)", self.name, exc)
        except OSError as exc:
            log.warning("login in %s by docker exec: %r", self.name, exc)
        return None

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        p = Path(path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(p.name)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(mtime if mtime is not None else time.time())
            tar.addfile(info, io.BytesIO(data))
        await engine.call("put archive", self._container().put_archive(str(p.parent), buf.getvalue()))  # type: ignore[no-untyped-call]

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        view = await self._host_view()
        if view is not None:
            try:
                return await asyncio.to_thread(hostfs.read_file, view.root, path, max_bytes, view.verify)
            except (hostfs.NeedEngine, OSError) as exc:
                log.debug("reading %s from the host: %s; asking the engine", path, exc)
        if any(path == m or path.startswith(m.rstrip("/") + "/") for m in self._tmpfs):
            return await self._read_by_exec(path, max_bytes)
        stat = await self._stat(path)
        if stat is None:
            return None
        mode = int(stat.get("mode", 0))
        size = int(stat.get("size", 0))
        # Go's os.FileMode: the type bits sit above the permission bits (dir 1<<31, symlink 1<<27, ...).
        is_regular = mode & 0xFFFFFE00 == 0
        data = None
        if is_regular and size <= max_bytes:
            tar = await engine.call("get archive", self._container().get_archive(path))
            try:
                with tar:
                    member = tar.next()
                    if member is not None and member.isfile() and member.size <= max_bytes:
                        f = tar.extractfile(member)
                        data = f.read() if f is not None else None
            except (tarfile.TarError, OSError) as exc:  # e.g. the file changed while the engine read it
                raise SandboxError(f"reading {path!r}: {exc}") from exc
        return FileData(path=path, size=size, mode=mode & 0o7777, is_regular=is_regular, data=data)

    async def _read_by_exec(self, path: str, max_bytes: int) -> FileData | None:
        """Stat and read through the box's own tools (tmpfs mounts); content bounded by ``head -c``."""
        script = 'stat -L -c "%s %f" -- "$1" && if [ -f "$1" ]; then head -c "$2" -- "$1"; fi'
        proc = await self.exec(["sh", "-c", script, "sh", path, str(max_bytes + 1)])
        await proc.close_stdin()
        out = bytearray()
        while (chunk := await proc.read()) is not None:
            if chunk.stream == 1 and len(out) <= max_bytes + 64:
                out += chunk.data
        if (await proc.wait()).code != 0 or b"\n" not in out:
            return None
        head, _, body = bytes(out).partition(b"\n")
        try:
            size_text, mode_hex = head.decode().split()
            size, raw_mode = int(size_text), int(mode_hex, 16)
        except ValueError:
            return None
        is_regular = raw_mode & 0o170000 == 0o100000
        data = body if is_regular and size <= max_bytes and len(body) == size else None
        return FileData(path=path, size=size, mode=raw_mode & 0o7777, is_regular=is_regular, data=data)

    async def _stat(self, path: str) -> dict[str, Any] | None:
        """The engine's stat of a path (HEAD on the archive endpoint): no content is transferred."""

        async def head() -> dict[str, Any] | None:
            try:
                async with self._client._query(
                    f"containers/{self.id}/archive", method="HEAD", params={"path": path}
                ) as resp:
                    header = resp.headers.get("X-Docker-Container-Path-Stat", "")
                    return json.loads(base64.b64decode(header)) if header else None
            except ValueError:
                # An error answer to HEAD has no body for the client to parse: the path is not there.
                return None

        try:
            return await engine.call("stat", head())
        except SandboxError as exc:
            if engine.is_not_found(exc):
                return None
            raise

    async def changed_files(self) -> list[ChangedFile]:
        """What the box changed: read on this host when its files are here, else through the engine."""
        info = await engine.call("inspect", self._container().show())
        view = HostView.from_inspect(info)
        self._host, self._host_checked = view, True
        if view is not None:
            try:
                return await asyncio.to_thread(self._changed_on_host, view)
            except (hostfs.NeedEngine, OSError) as exc:
                log.info("changed files from the host failed (%s); asking the engine", exc)
        return await self._changed_by_engine()

    def _changed_on_host(self, view: HostView) -> list[ChangedFile]:
        out = hostfs.upper_changes(view.upper, view.lowers)
        for mount in view.tmpfs:
            out += [ChangedFile(p, "A") for p in hostfs.new_files(view.root, mount, None, view.verify)]
        for mount in view.volumes:
            found = hostfs.new_files(view.root, mount, self.seeded_at, view.verify)
            out += [ChangedFile(p, "C") for p in found if p.lstrip("/") not in _ENGINE_FILES]
        return out

    async def _changed_by_engine(self) -> list[ChangedFile]:
        """The engine's diff against the image, plus regular files in the tmpfs mounts it cannot see."""
        raw = await engine.call("container changes", self._client._query_json(f"containers/{self.id}/changes"))
        out = [ChangedFile(c["Path"], _KIND.get(c["Kind"], "C")) for c in raw or []]  # type: ignore[arg-type]
        info = await engine.call("inspect", self._container().show())
        running = info.get("State", {}).get("Running")
        tmpfs = sorted((info.get("HostConfig") or {}).get("Tmpfs") or {})
        if tmpfs and running:
            out += [ChangedFile(p, "A") for p in await self._find([*tmpfs, "-xdev", "-type", "f"])]
        # The writable mounts of a read-only root: what changed after seeding (ctime cannot be set back).
        volumes = sorted(m["Destination"] for m in info.get("Mounts") or [] if m.get("Type") == "volume")
        if volumes and running:
            since = ["-newerct", f"@{self.seeded_at:.6f}"] if self.seeded_at is not None else []
            found = await self._find([*volumes, "-xdev", "-type", "f", *since])
            out += [ChangedFile(p, "C") for p in found if p.lstrip("/") not in _ENGINE_FILES]
        return out

    async def _find(self, args: list[str]) -> list[str]:
        proc = await self.exec(["find", *args], user="root")
        data = bytearray()
        while (chunk := await proc.read()) is not None:
            if chunk.stream == 1 and len(data) < 4 * 1024 * 1024:
                data += chunk.data
        await proc.wait()
        return [line for line in data.decode("utf-8", "surrogateescape").splitlines() if line]

    async def host_root(self) -> Path | None:
        """The overlay ``merged`` directory, when the engine's storage is on this host."""
        try:
            info = await engine.call("inspect", self._container().show(), 10)
        except SandboxError:
            return None
        merged = ((info.get("GraphDriver") or {}).get("Data") or {}).get("MergedDir")
        path = Path(merged) if merged else None
        return path if path is not None and path.is_dir() else None

    async def is_running(self) -> bool:
        try:
            info = await engine.call("inspect", self._container().show(), 10)
        except SandboxError as exc:
            if engine.is_not_found(exc):
                return False
            raise
        return bool(info.get("State", {}).get("Running"))

    async def stop(self) -> None:
        try:
            await engine.call("stop", self._container().stop(t=2), 30)
        except SandboxError as exc:
            if not engine.is_not_found(exc) and "304" not in str(exc):
                raise
        await self._drop_parent()

    async def remove(self) -> None:
        try:
            await engine.call("remove", self._container().delete(force=True, v=True), 30)
        except SandboxError as exc:
            if not engine.is_not_found(exc) and "409" not in str(exc):
                raise
        await self._drop_parent()

    @property
    def session_scopes(self) -> bool:
        return self.parents is not None and bool(self.cgroup)

    async def network_address(self) -> str:
        """The box's eth0 IPv4 address (sandbox.network: internal), from the engine's inspect (cached); ''."""
        view = await self._host_view()
        return view.address if view is not None else ""

    async def enter_scope(self, session_id: int, unit: str) -> None:
        """Move the processes of login ``session_id`` (``XDG_SESSION_ID``) into ``unit`` below the box's cgroup,
        where pam_systemd puts a login (``user.slice/user-<uid>.slice/session-<n>.scope``). Only with a parent
        cgroup (limits_in_parent); a failure costs realism, never the session."""
        if self.parents is None or not self.cgroup:
            return
        marker = f"XDG_SESSION_ID={session_id}".encode()
        try:
            moved = await asyncio.to_thread(self.parents.join, self.cgroup, self.id, unit, marker)
        except (OSError, ValueError) as exc:
            log.debug("session scope %s not entered: %s", unit, exc)
            return
        if not moved:
            log.debug("session scope %s: no process of the login found", unit)

    async def _drop_parent(self) -> None:
        """The parent cgroup goes with the box. The engine removes the box's own cgroup just after the stop
        returns: wait for that (3 s at most; else the backend's sweep removes it later)."""
        if self.parents is None or not self.cgroup:
            return
        for _ in range(30):
            if await asyncio.to_thread(self.parents.remove, self.cgroup):
                self.cgroup = ""
                return
            await asyncio.sleep(0.1)


# Per engine client: the exec processes started through it, closed with it (DockerBackend.close).
_OPEN: dict[int, weakref.WeakSet[DockerProcess]] = {}  # (the listener's processes close with their sockets)

# Per engine address: the open-files hard limit the engine was last seen to grant (see DockerBackend.create).
_NOFILE_LEARNED: dict[str, int] = {}


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


def init_transport_refused(s: SandboxSettings) -> str:
    """Why logins cannot be started by the box's listener (``session_transport: init``), or ''."""
    if s.session_transport != "init":
        return "session_transport is exec"
    if s.docker_host and not s.docker_host.startswith("unix://"):
        return f"the engine at {s.docker_host} is not on this host"
    if os.geteuid() != 0:
        return "the honeypot does not run as root (entering a box's network namespace needs it)"
    return ""


class DockerBackend:
    """Creates hardened containers for one sensor and finds those a previous run left.

    ``files`` (path relative to / -> content, mode, mtime) are written into every box before its init
    runs: the sensor's SSH host keys (``sandbox.share_host_keys``)."""

    def __init__(
        self,
        settings: SandboxSettings,
        sensor: str,
        seccomp: str | None,
        files: Mapping[str, tuple[bytes, int, float]] | None = None,
    ) -> None:
        """``seccomp``: the profile's JSON text, read once (``seccomp.resolve``); None = the engine's default."""
        self._settings = settings
        self._sensor = sensor
        self._seccomp = seccomp
        self._planted = files_archive(files) if files else b""
        self._client = engine.connect(settings.docker_host)
        self._image_seed: tuple[bytes, str] | None = None
        self._network_ready = False
        self._network_lock = asyncio.Lock()
        # Lowered if the engine cannot grant it (create); what one backend learned, the next starts from.
        self._nofile_hard = min(settings.ulimit_nofile_hard, _NOFILE_LEARNED.get(settings.docker_host, 1 << 30))
        # Where limits go and how many CPUs the engine's host has: decided once, from the engine's info.
        self._placement_lock = asyncio.Lock()
        self._placed = False
        self._parents: ParentCgroups | None = None
        self._creating: set[str] = set()  # parents made but not yet holding their box: never swept
        self._cpu_list: list[int] = []  # the CPUs boxes may be pinned to
        self._mask_systemd_cgroup = False
        self._systemd = False  # sandbox.init: systemd, where this host allows it (decided with the placement)
        self._init_refused = init_transport_refused(settings)
        self._transparent_refused = "sandbox.network is none"  # until the host's rules are in place
        if settings.session_transport == "init" and self._init_refused:
            log.warning("logins by docker exec, not by the box's listener: %s", self._init_refused)

    @property
    def settings(self) -> SandboxSettings:
        return self._settings

    @property
    def nofile_hard(self) -> int:
        """The open-files hard limit boxes get: ``ulimit_nofile_hard``, or less where the engine cannot grant it."""
        return self._nofile_hard

    def labels(self, session: str = "", src_ip: str = "") -> dict[str, str]:
        return {
            LABEL_MANAGED: "true",
            LABEL_SENSOR: self._sensor,
            LABEL_CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
            LABEL_SESSION: session,
            LABEL_SRC_IP: src_ip,
            LABEL_ROLE: "session" if session else "warm",
        }

    def new_name(self, session: str = "") -> str:
        kind = f"s-{safe_name(session)}" if session else f"w-{secrets.token_hex(4)}"
        return f"sandtrap-{safe_name(self._sensor)}-{kind}"

    async def _ensure_network(self) -> None:
        if self._settings.network != "internal" or self._network_ready:
            return
        async with self._network_lock:
            if not self._network_ready:
                bridge = await network.ensure_network(self._client, self._settings)
                if self._settings.connection_in_box and not self._init_refused:
                    self._transparent_refused = await relay.open_reply_path(bridge)
                self._network_ready = True

    @property
    def parents(self) -> ParentCgroups | None:
        """The per-box parent cgroups, when limits go there (``limits_in_parent`` and a host that allows it)."""
        return self._parents

    async def _placement(self) -> None:
        if self._placed:
            return
        async with self._placement_lock:
            if self._placed:
                return
            s = self._settings
            # A local engine (a unix socket): its host is this one; its info is not needed (and the engine
            # proxy, a local socket too, does not pass GET /info on). A remote one: CPUs from its info.
            local = not s.docker_host or s.docker_host.startswith("unix://")
            if local:
                self._cpu_list = sorted(os.sched_getaffinity(0))
                v1 = not await asyncio.to_thread(Path("/sys/fs/cgroup/cgroup.controllers").exists)
            else:
                try:
                    info = await engine.call("engine info", self._client.system.info(), 10)
                    self._cpu_list = list(range(int(info.get("NCPU") or 0)))
                except SandboxError as exc:
                    log.info("engine info not readable (%s): boxes are not pinned to CPUs", exc)
                v1 = False
            self._mask_systemd_cgroup = bool(
                s.mask_cgroupns
                and s.cgroupns == "private"
                and v1
                and await asyncio.to_thread(Path(SYSTEMD_CGROUP).is_dir)
            )
            if s.init == "systemd":
                reason = systemd_cgroups.unavailable(local, v1, s.cgroupns, self._mask_systemd_cgroup)
                self._systemd = True
                if reason:
                    self._no_systemd(reason)
            if s.limits_in_parent:
                parents = ParentCgroups(prefix=f"sandtrap-{safe_name(self._sensor)}")
                reason = parents.available() if local else f"the engine at {s.docker_host} is not on this host"
                if reason:
                    log.warning(
                        "sandbox limits stay on each container, where a box sees them at its root cgroup (%s)", reason
                    )
                else:
                    self._parents = parents
                    swept = await asyncio.to_thread(parents.sweep, set(self._creating))
                    if swept:
                        log.info("removed %d parent cgroups of boxes that are gone", swept)
            if self._systemd and self._parents is None:
                self._no_systemd("its cgroups are handed over from a per-box parent cgroup, and boxes have none")
            self._placed = True

    async def create(self, labels: Mapping[str, str], name: str) -> DockerSandbox:
        """A started box. A box's open-files hard limit cannot exceed the engine's own (runc sets it without
        CAP_SYS_RESOURCE): when the engine refuses ``ulimit_nofile_hard``, halve it (down to the soft limit)
        until it starts, and keep that value for the boxes that follow."""
        while True:
            tried = self._nofile_hard
            try:
                return await self._create(labels, name, tried)
            except SandboxError as exc:
                soft = self._settings.ulimit_nofile
                if "error setting rlimit type 7" not in str(exc) or tried <= soft:
                    raise
                if tried == self._nofile_hard:
                    self._nofile_hard = max(soft, tried // 2)
                    _NOFILE_LEARNED[self._settings.docker_host] = self._nofile_hard
                    log.warning(
                        "the engine cannot give sandboxes an open-files hard limit of %d (its own is lower; raise "
                        "LimitNOFILE of containerd and docker, or lower sandbox.ulimit_nofile_hard): trying %d",
                        tried,
                        self._nofile_hard,
                    )

    async def _create(self, labels: Mapping[str, str], name: str, nofile_hard: int) -> DockerSandbox:
        await self._ensure_network()
        await self._placement()
        settings = self._settings
        if nofile_hard != settings.ulimit_nofile_hard:
            settings = settings.model_copy(update={"ulimit_nofile_hard": nofile_hard})
        cgroup = secrets.token_hex(6) if self._parents is not None else ""
        cpuset = cpuset_for(cgroup or name, settings.cpus, self._cpu_list) if settings.pin_cpus else ""
        self._creating.add(cgroup)
        try:
            parent = ""
            if self._parents is not None:
                limits = Limits(
                    settings.memory, settings.memory_swap or settings.memory, settings.cpus, settings.pids_limit
                )
                try:
                    parent = await asyncio.to_thread(self._parents.create, cgroup, limits)
                except CgroupError as exc:
                    raise SandboxError(f"cannot make the box's parent cgroup: {exc}") from exc
            config = create_config(
                settings, labels, self._seccomp, parent, cpuset, self._mask_systemd_cgroup, self._systemd
            )
            try:
                container = await engine.call(
                    "create container", self._client.containers.create(config, name=name), settings.start_timeout_s
                )
            except BaseException as exc:
                if self._parents is not None:
                    self._parents.remove(cgroup)
                if parent and isinstance(exc, SandboxError) and "cgroup" in str(exc).lower():
                    # e.g. the systemd cgroup driver, which takes only `*.slice` parents
                    self._no_parents(f"the engine refused the parent cgroup: {exc}")
                    return await self._create(labels, name, nofile_hard)
                if self._systemd and isinstance(exc, SandboxError) and "403" in str(exc):
                    # e.g. the engine proxy, which refuses what systemd needs (CAP_SETPCAP) as a parent cgroup
                    self._no_systemd(f"the engine refused the container systemd needs: {exc}")
                    return await self._create(labels, name, nofile_hard)
                raise
            sandbox = DockerSandbox(self._client, container.id, name, tuple(settings.tmpfs))
            sandbox.cgroup, sandbox.parents = cgroup, self._parents
            self._share_relay(sandbox)
            seeded = settings.read_only_root and bool(settings.writable)
            try:
                if self._planted and not seeded:  # in the container's own layer, before init starts sshd
                    await engine.call("plant files", container.put_archive("/", self._planted), 30)  # type: ignore[no-untyped-call]
                await engine.call("start container", container.start(), settings.start_timeout_s)
                if parent and not await self._check_placement(sandbox, parent):
                    await asyncio.shield(sandbox.remove())
                    self._no_parents(f"box {name} did not start below its parent cgroup {parent}")
                    return await self._create(labels, name, nofile_hard)
                if seeded:
                    await self._seed(sandbox)
                if self._systemd:
                    await self._start_systemd(sandbox, parent)
            except BaseException:
                await asyncio.shield(sandbox.remove())
                raise
            return sandbox
        finally:
            self._creating.discard(cgroup)

    async def _start_systemd(self, sandbox: DockerSandbox, parent: str) -> None:
        """Hand the box its cgroups (its init then execs systemd) and wait until systemd has started the listener
        (ssh.service), 10 s at most. When the hand-over fails, its init goes on as sandtrap's."""
        view = await sandbox._host_view()
        if view is None:
            log.warning("box %s keeps sandtrap's init: its pid 1 is not visible on this host", sandbox.name)
            return
        try:
            await systemd_cgroups.hand_over(view.pid, view.mnt_ns, sandbox.id, parent)
        except systemd_cgroups.HandOverError as exc:
            log.warning("box %s keeps sandtrap's init: %s", sandbox.name, exc)
            with contextlib.suppress(OSError):
                os.kill(view.pid, systemd_cgroups.GIVE_UP_SIGNAL)
            return
        if not await asyncio.to_thread(systemd_cgroups.wait_for_listener, view.pid, view.verify):
            log.warning("box %s: systemd did not start ssh.service within %.0f s", sandbox.name, systemd_cgroups.BOOT_S)

    def _no_parents(self, reason: str) -> None:
        log.warning("sandbox limits stay on each container from now on (%s)", reason)
        self._parents = None
        if self._systemd:
            self._no_systemd("its cgroups are handed over from a per-box parent cgroup, and boxes have none now")

    def _no_systemd(self, reason: str) -> None:
        log.warning("boxes keep sandtrap's init, not systemd (%s)", reason)
        self._systemd = False

    async def _check_placement(self, sandbox: DockerSandbox, parent: str) -> bool:
        """The box's processes are below its parent in every limiting hierarchy (else it would be unlimited)."""
        info = await engine.call("inspect", sandbox._container().show(), 10)
        pid = int((info.get("State") or {}).get("Pid") or 0)
        try:
            rows = (await asyncio.to_thread(Path(f"/proc/{pid}/cgroup").read_text)).splitlines() if pid > 0 else []
        except OSError:
            rows = []
        where = {ctrl: path for _, ctrls, path in (r.split(":", 2) for r in rows) for ctrl in ctrls.split(",")}
        wrong = [c for c in ParentCgroups.CONTROLLERS if not where.get(c, "").startswith(parent + "/")]
        if wrong:
            log.error("box %s is not below its parent cgroup %s for %s", sandbox.name, parent, ", ".join(wrong))
        return not wrong

    async def _seed(self, sandbox: DockerSandbox) -> None:
        """Fill the writable tmpfs mounts with the image's files (owners, modes and times kept), then tell
        init, which waits for them before it starts the box's daemons."""
        if self._image_seed is None:
            self._image_seed = await self._image_files()
        data, fix_roots = self._image_seed
        # --skip-old-files: what the box's init wrote at boot (/etc/machine-id) stays. The planted files
        # (host keys) then replace the image's in the fresh mounts, before init starts the daemons.
        script = f"tar -x -p --numeric-owner --skip-old-files -C / -f - && {fix_roots}"
        await self._run_with_input(sandbox, script, data, "seeding the writable mounts")
        if self._planted:
            await self._run_with_input(sandbox, "tar -x -p --numeric-owner -C / -f -", self._planted, "planting files")
        await self._run_with_input(sandbox, "kill -USR1 1", b"", "starting the daemons")  # init.c, wait_for_files
        sandbox.seeded_at = time.time()

    @staticmethod
    async def _run_with_input(sandbox: DockerSandbox, script: str, data: bytes, what: str) -> None:
        proc = await sandbox.exec(["sh", "-c", script])
        if data:
            await proc.write(data)
        await proc.close_stdin()
        err = bytearray()
        while (chunk := await proc.read()) is not None:
            if chunk.stream == 2 and len(err) < 4096:
                err += chunk.data
        status = await proc.wait()
        if status.code != 0:
            raise SandboxError(f"{what} failed ({status.code}): {err.decode(errors='replace')}")

    async def _image_files(self) -> tuple[bytes, str]:
        """The image's files under each writable path, read once from a container that never starts."""
        s = self._settings
        labels = {**self.labels(), LABEL_ROLE: "template"}
        config = create_config(s.model_copy(update={"read_only_root": False}), labels, self._seccomp)
        name = f"sandtrap-{safe_name(self._sensor)}-t-{secrets.token_hex(4)}"
        template = await engine.call("create template", self._client.containers.create(config, name=name))
        try:
            parts = {p: await engine.call(f"read {p} from the image", template.get_archive(p)) for p in s.writable}
        finally:
            await asyncio.shield(DockerSandbox(self._client, template.id, name).remove())
        return seed_archive(parts)

    async def assign(self, sandbox: Sandbox, session: str, src_ip: str) -> None:
        """Docker labels are immutable: a warm box takes the session into its name instead."""
        new = f"{self.new_name(session)}-{secrets.token_hex(2)}"
        await engine.call("rename", self._client.containers.container(sandbox.id).rename(new), 10)
        sandbox.name = new

    def sandbox(self, container_id: str, name: str) -> DockerSandbox:
        sandbox = DockerSandbox(self._client, container_id, name, tuple(self._settings.tmpfs))
        self._share_relay(sandbox)
        return sandbox

    def _share_relay(self, sandbox: DockerSandbox) -> None:
        """What the backend knows about the transport and the login's connection, given to one of its boxes."""
        sandbox.init_refused = self._init_refused
        sandbox.connection_in_box = self._settings.connection_in_box
        sandbox.transparent_refused = self._transparent_refused

    async def list_managed(self) -> list[SandboxInfo]:
        """Every container of this sensor, with the state it is in now (and the parent cgroups of boxes that
        are gone removed: a crash or a busy rmdir at stop leaves them)."""
        if self._parents is not None:
            await asyncio.to_thread(self._parents.sweep, set(self._creating))
        filters = {"label": [f"{LABEL_MANAGED}=true", f"{LABEL_SENSOR}={self._sensor}"]}
        rows = await engine.call("list containers", self._client.containers.list(all=True, filters=filters))
        out = []
        for c in rows:
            raw = c._container
            labels: dict[str, str] = raw.get("Labels") or {}
            name = (raw.get("Names") or ["/" + c.id[:12]])[0].lstrip("/")
            running = raw.get("State") == "running"
            is_session = bool(labels.get(LABEL_SESSION)) or "-s-" in name
            state = ("active" if is_session else "warm") if running else "preserved"
            released = None if running else await self._finished_at(c.id)
            out.append(
                SandboxInfo(
                    id=c.id,
                    name=name,
                    state=state,  # type: ignore[arg-type]
                    created=datetime.fromtimestamp(raw.get("Created", 0), UTC),
                    session=labels.get(LABEL_SESSION, ""),
                    src_ip=labels.get(LABEL_SRC_IP, ""),
                    released=released,
                    labels=labels,
                )
            )
        return out

    async def _finished_at(self, container_id: str) -> datetime | None:
        try:
            info = await engine.call("inspect", self._client.containers.container(container_id).show())
        except SandboxError:
            return None
        return parse_docker_time((info.get("State") or {}).get("FinishedAt") or "")

    async def ping(self) -> None:
        await engine.call("ping", self._client.version(), 5)

    async def close(self) -> None:
        if self._parents is not None:  # parents of boxes that are gone, and the sensor's directory if empty
            await asyncio.to_thread(self._parents.sweep, set(self._creating), True)
        # Exec streams still open (a task cancelled mid-session at shutdown) go back before the client does.
        for proc in list(_OPEN.pop(id(self._client), ())):
            await proc.kill()
        await engine.close(self._client)
