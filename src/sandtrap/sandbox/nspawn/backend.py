"""``sandbox.backend: nspawn``: a systemd-nspawn container per box, with no container daemon.

A box is: a state directory (``state.py``), an overlay over the image's tree with its writes on a size-limited
tmpfs (``mounts.py``), a per-box parent cgroup with the limits (``host/cgroups.py``) and systemd-nspawn running
sandtrap's init in it (``launch.py``). Logins and commands reach the box's listener as on Docker (host/broker.py,
from a thread in the box's network namespace). systemd-nspawn is started in a session of its own: it outlives a
killed honeypot, whose successor finds the box by its state directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

from sandtrap.config import ImageSettings, NspawnSettings, SandboxSettings
from sandtrap.errors import ConfigError, SandboxError, SandboxUnavailable
from sandtrap.sandbox.base import SandboxInfo, run
from sandtrap.sandbox.docker.spec import safe_name
from sandtrap.sandbox.host import systemd_cgroups
from sandtrap.sandbox.host.cgroups import CgroupError, Limits, ParentCgroups
from sandtrap.sandbox.host.inotify import OpenWatcher
from sandtrap.sandbox.host.procviews import ProcViews
from sandtrap.sandbox.nspawn import launch, mounts, state, views
from sandtrap.sandbox.nspawn.image import find_tree, tree_inputs
from sandtrap.sandbox.nspawn.sandbox import STOP_GRACE_SYSTEMD_S, NspawnSandbox
from sandtrap.sandbox.nspawn.seccomp import filter_program
from sandtrap.sandbox.nspawn.state import BoxRecord
from sandtrap.sandbox.personas import Persona

log = logging.getLogger(__name__)

Planted = dict[str, tuple[bytes, int, float]]
READY_POLL_S = 0.05


def seed_files(box: SandboxSettings, planted: Planted | None) -> Planted:
    """The per-box lower layer: hostname, and hosts and resolv.conf byte for byte as the box's init writes them at
    boot (box/init.c ``names()``: a rewrite with the same bytes is no change), and the sensor's planted files (its
    SSH host keys)."""
    now = time.time()
    if box.domain:
        hosts = (
            f"127.0.0.1\tlocalhost\n127.0.1.1\t{box.hostname}.{box.domain}\t{box.hostname}\n\n"
            "# The following lines are desirable for IPv6 capable hosts\n"
            "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n"
        )
        resolv = f"search {box.domain}\nnameserver 10.20.0.2\nnameserver 10.20.0.3\n"
    else:
        hosts, resolv = f"127.0.0.1\tlocalhost\n127.0.1.1\t{box.hostname}\n", "nameserver 10.20.0.2\n"
    files: Planted = {
        "etc/hostname": (f"{box.hostname}\n".encode(), 0o644, now),
        "etc/hosts": (hosts.encode(), 0o644, now),
        "etc/resolv.conf": (resolv.encode(), 0o644, now),
    }
    files.update(planted or {})
    return files


class NspawnBackend:
    """:class:`~sandtrap.sandbox.base.SandboxBackend` for systemd-nspawn. ``root``: this sensor's boxes
    (``<data_dir>/nspawn``, one directory per box under ``boxes/``). ``attach`` (network.mode capture): gives the box
    whose PID 1 is that host pid its ``eth0`` on the capture gateway, as Docker's boxes get it
    (:meth:`sandtrap.network.gateway.Gateway.attach`); its address. ``relay_netns``: the gateway's namespace (a
    path), where a login's connection from a client off loopback is made (host/relay.py)."""

    def __init__(
        self,
        settings: NspawnSettings,
        box: SandboxSettings,
        image: ImageSettings,
        cache_dir: Path,
        root: Path,
        sensor: str,
        planted: Planted | None = None,
        attach: Callable[[int], Awaitable[str]] | None = None,
        relay_netns: str = "",
    ) -> None:
        check_network(box.network, attach is not None)
        if os.geteuid() != 0:
            raise SandboxUnavailable("sandbox.backend: nspawn needs the honeypot to run as root (mounts, namespaces)")
        self._settings = settings
        self._box = box
        self._inputs = tree_inputs(image)
        self._cache_dir = Path(cache_dir)
        self._boxes = Path(root) / "boxes"
        self._boxes.mkdir(parents=True, exist_ok=True)
        self._boxes.chmod(0o700)
        self._seed = seed_files(box, planted)
        # sandtrap's seccomp filter (seccomp.py), compiled once; every box's nspawn loads it
        self._filter = Path(root) / "seccomp.bpf"
        self._filter.write_bytes(filter_program())
        self._sensor = safe_name(sensor)
        # nspawn takes a host name as the machine's name: letters, digits and '-' only
        self._machine = "sandtrap-" + re.sub(r"[^a-zA-Z0-9-]", "-", sensor)[:40].strip("-")
        # lxcfs's and loadavgfs's views: bound in once the box's PID 1 runs (views.py), not by nspawn's --bind-ro
        self._views = ProcViews(box.lxcfs_dir, box.loadavg_dir)
        self._reads = OpenWatcher()
        parents = ParentCgroups(prefix=f"sandtrap-{self._sensor}-nspawn")
        reason = parents.available()
        self._parents: ParentCgroups | None = None if reason else parents
        if reason:
            log.warning("nspawn boxes get no memory, pids or CPU limits: %s", reason)
        self._live: dict[str, NspawnSandbox] = {}
        self._systemd = box.init == "systemd"
        if self._systemd and (why := self._systemd_unavailable()):
            log.warning("boxes keep sandtrap's init, not systemd (sandbox.init: systemd): %s", why)
            self._systemd = False
        self._attach = attach if box.network == "capture" else None
        self._relay_netns = relay_netns if self._attach is not None else ""

    def _systemd_unavailable(self) -> str:
        """Why boxes cannot boot systemd here ('' when they can): its cgroups are handed over from the per-box
        parent's ``name=systemd`` hierarchy (cgroup v1), as on Docker."""
        if self._parents is None:
            return "it needs the per-box parent cgroups, which are not available here"
        if not (systemd_cgroups.HIERARCHY / "cgroup.procs").exists():
            return f"no cgroup v1 name=systemd hierarchy at {systemd_cgroups.HIERARCHY}"
        return ""

    def _sandbox(self, directory: Path, record: BoxRecord) -> NspawnSandbox:
        return NspawnSandbox(
            directory,
            record,
            self._parents,
            self._reads,
            self._box.connection_in_box,
            self._relay_netns,
            STOP_GRACE_SYSTEMD_S if self._systemd else None,
        )

    @property
    def parents(self) -> ParentCgroups | None:
        return self._parents

    def tree(self) -> Path:
        found = find_tree(self._cache_dir, self._inputs)
        if found is None:
            raise SandboxUnavailable(
                f"the nspawn tree for these settings ({self._inputs[:16]}) is not in {self._cache_dir}: "
                "run `sandtrap image build` (with sandbox.backend: nspawn)"
            )
        return found

    async def ping(self) -> None:
        if shutil.which(self._settings.nspawn) is None:
            raise SandboxUnavailable(
                f"sandbox.nspawn.nspawn: {self._settings.nspawn} not found: apt-get install systemd-container"
            )
        self.tree()

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> NspawnSandbox:
        """A started box; ``persona`` is not used (config refuses personas with this backend)."""
        tree = self.tree()
        box_id = secrets.token_hex(6)
        directory = self._boxes / box_id
        await asyncio.to_thread(directory.mkdir, 0o700)
        record = BoxRecord(id=box_id, name=f"{self._machine}-{box_id}", created=BoxRecord.now(),
                           tree=str(tree))  # fmt: skip
        sandbox = self._sandbox(directory, record)
        started = time.monotonic()
        try:
            await asyncio.to_thread(state.save, directory, record)
            await asyncio.to_thread(mounts.write_seed, directory / "seed", self._seed)
            root = await asyncio.to_thread(mounts.mount_box, directory, tree, self._settings.disk_size)
            procs = await self._cgroup(record)
            argv = launch.argv(
                self._settings,
                self._box,
                record.name,
                root,
                [],
                procs,
                self._filter,
                self._systemd,
            )
            await self._start(sandbox, argv)
            await views.bind_views(record.init_pid, await asyncio.to_thread(self._views.binds))
            if self._attach is not None:
                await self._link(sandbox)
            if self._systemd:
                await self._start_systemd(sandbox)
            await self._ready(sandbox)
            log.info("box %s ready %.2fs after its creation began", record.name, time.monotonic() - started)
            if session:
                await sandbox.claim(session, src_ip)
        except BaseException:
            sandbox.kill_now()  # at once: a cancelled create may never see its shielded removal finish
            try:
                await asyncio.shield(sandbox.remove())
            except BaseException:
                await asyncio.to_thread(mounts.unmount_box, directory)
            raise
        self._live[box_id] = sandbox
        return sandbox

    async def _cgroup(self, record: BoxRecord) -> list[str]:
        """The per-box parent cgroup with the limits; the ``cgroup.procs`` files nspawn enters."""
        if self._parents is None:
            return []
        b = self._box
        limits = Limits(b.memory, b.memory_swap or b.memory, b.cpus, b.pids_limit)
        try:
            await asyncio.to_thread(self._parents.create, record.id, limits)
        except CgroupError as exc:
            raise SandboxError(f"cannot make the box's parent cgroup: {exc}") from exc
        record.cgroup, record.cgroup_prefix = record.id, self._parents.prefix
        p = self._parents
        try:
            return await asyncio.to_thread(
                launch.cgroup_procs, p.root, p.prefix, record.id, launch.box_hierarchies(p.root)
            )
        except OSError as exc:
            raise SandboxError(f"cannot make the box's cgroup: {exc}") from exc

    async def _start(self, sandbox: NspawnSandbox, argv: list[str]) -> None:
        record, directory = sandbox.record, sandbox.directory
        logfile = await asyncio.to_thread(
            os.open, directory / "nspawn.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True,
                env=launch.environment(),
            )  # fmt: skip
        finally:
            os.close(logfile)
        record.nspawn_pid, record.nspawn_start = proc.pid, state.start_time(proc.pid)
        # nspawn is not waited for here: a task reaps it (it outlives us if we are killed)
        asyncio.get_running_loop().create_task(proc.wait())
        deadline = time.monotonic() + self._box.start_timeout_s
        while not record.init_pid:
            if proc.returncode is not None or time.monotonic() > deadline:
                raise SandboxError(f"systemd-nspawn of {record.name} did not start the box: {_tail(directory)}")
            record.init_pid = await asyncio.to_thread(_find_init, proc.pid)
            if not record.init_pid:
                await asyncio.sleep(READY_POLL_S)
        record.init_start = state.start_time(record.init_pid)
        await asyncio.to_thread(state.save, directory, record)
        sandbox.watch_nspawn()
        await _tidy_mounts(record.init_pid, launch.run_size(self._box, self._systemd))

    async def _start_systemd(self, sandbox: NspawnSandbox) -> None:
        """Hand the box its own ``name=systemd`` cgroups (host/systemd_cgroups.py, as on Docker; below the box's
        ``payload`` cgroup where nspawn put its PID 1): its init then execs systemd, which starts the listener as
        ssh.service. When the hand-over fails, its init goes on as sandtrap's (told at once)."""
        record = sandbox.record
        assert self._parents is not None
        inner = launch.INNER_CGROUPS["systemd"]
        exact = f"/{self._parents.prefix}/{record.id}/{launch.BOX_CGROUP}/{inner}"
        await systemd_cgroups.boot(record.init_pid, None, record.name, sandbox.is_alive, record.id, exact=exact)

    async def _link(self, sandbox: NspawnSandbox) -> None:
        """The box's eth0 on the capture gateway (network.mode: capture): a veth pair from the gateway's namespace
        into the box's own (nspawn's ``--private-network``), by the gateway's code, as for Docker's boxes."""
        assert self._attach is not None
        record = sandbox.record
        started = time.monotonic()
        record.address = await self._attach(record.init_pid)
        await asyncio.to_thread(state.save, sandbox.directory, record)
        log.info("box %s: eth0 %s on the capture gateway (%.2fs)", record.name, record.address,
                 time.monotonic() - started)  # fmt: skip

    async def _ready(self, sandbox: NspawnSandbox) -> None:
        """Until the box's listener runs a command, within sandbox.start_timeout_s."""
        deadline = time.monotonic() + self._box.start_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not await sandbox.is_running():
                raise SandboxError(f"box {sandbox.name} ended while starting: {_tail(sandbox.directory)}")
            try:
                if (await run(sandbox, ["true"], timeout_s=5)).ok:
                    return
            except (SandboxError, TimeoutError) as exc:
                last = exc
            await asyncio.sleep(READY_POLL_S)
        raise SandboxError(
            f"box {sandbox.name}: its listener did not answer within {self._box.start_timeout_s:.0f}s "
            f"(sandbox.start_timeout_s; last: {last})"
        )

    def sandbox(self, sandbox_id: str, name: str) -> NspawnSandbox:
        if (live := self._live.get(sandbox_id)) is not None:
            return live
        directory = self._boxes / sandbox_id
        record = state.load(directory) or BoxRecord(sandbox_id, name, BoxRecord.now(), "", state="preserved")
        return self._sandbox(directory, record)

    async def list_managed(self) -> list[SandboxInfo]:
        out = []
        for directory in sorted(p for p in self._boxes.iterdir() if p.is_dir()):
            record = state.load(directory)
            if record is None:
                continue
            running = state.is_alive(record.init_pid, record.init_start)
            now = "preserved" if not running else ("active" if record.session else "warm")
            out.append(
                SandboxInfo(
                    id=record.id,
                    name=record.name,
                    state=now,  # type: ignore[arg-type]
                    created=state.when(record.created) or datetime.now(UTC),
                    session=record.session,
                    src_ip=record.src_ip,
                    acquired=state.when(record.acquired),
                    released=state.when(record.released),
                )
            )
        return out

    async def close(self) -> None:
        """The boxes run on (the pool stops what it owns); our watches end; parent cgroups no running box holds
        go, and the sensor's own cgroup directory when it is left empty."""
        self._reads.close()
        self._live.clear()
        if self._parents is not None:
            running = {i.id for i in await self.list_managed() if i.state != "preserved"}
            await asyncio.to_thread(self._parents.sweep, running, not running)


def check_network(mode: str, has_gateway: bool) -> None:
    """Refuse, at start, a ``network.mode`` nspawn boxes do not have."""
    if mode == "internal":
        raise ConfigError(
            "network.mode: internal is the Docker backend's engine network; nspawn boxes have no engine. Fix: set "
            "network.mode: capture (eth0 whose only peer is the capture gateway, nothing routed out) or none (lo only)"
        )
    if mode == "capture" and not has_gateway:
        raise ConfigError(
            "network.mode: capture: this nspawn backend was built without the capture gateway. Fix: start it "
            "through sandtrap's app (which builds the gateway), or set network.mode: none"
        )


def _find_init(nspawn_pid: int) -> int:
    """The box's PID 1 as this host sees it: nspawn's child in another PID namespace that runs /sbin/init."""
    try:
        own = os.readlink("/proc/self/ns/pid")
        with open(f"/proc/{nspawn_pid}/task/{nspawn_pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except (OSError, ValueError):
        return 0
    for pid in children:
        try:
            if os.readlink(f"/proc/{pid}/ns/pid") == own:
                continue
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[0] == b"/sbin/init":
                    return pid
        except OSError:
            continue
    return 0


async def _tidy_mounts(init_pid: int, run_size: str) -> None:
    """:data:`launch.TIDY` run in the box's mount and PID namespaces by the image's own shell (the box is fresh:
    its tools are ours), before the box is used."""
    proc = await asyncio.create_subprocess_exec(
        "nsenter", "-t", str(init_pid), "-m", "-p", "--", "/bin/sh", "-c", launch.TIDY, "sh", run_size,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise SandboxError(f"tidying the box's mounts: {out.decode(errors='replace')[:300]}")


def _tail(directory: Path, limit: int = 1500) -> str:
    with contextlib.suppress(OSError):
        return (directory / "nspawn.log").read_bytes()[-limit:].decode(errors="replace").strip() or "(no output)"
    return "(no nspawn.log)"
