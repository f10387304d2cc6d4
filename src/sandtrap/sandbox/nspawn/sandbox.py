"""One nspawn box behind the seam: logins and commands through the box's own listener (host/broker.py), files
read on the host from its overlay, its life through systemd-nspawn and its PID 1."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import (
    GONE,
    Argv,
    ChangedFile,
    ClientAddress,
    Features,
    FileData,
    Login,
    ReadReport,
    Snapshot,
    TermSize,
    Transport,
    diff_snapshots,
    run,
)
from sandtrap.sandbox.host import broker, hostfs, netns, relay
from sandtrap.sandbox.host.cgroups import ParentCgroups
from sandtrap.sandbox.host.inotify import OpenWatch, OpenWatcher
from sandtrap.sandbox.nspawn import launch, mounts, state
from sandtrap.sandbox.nspawn.state import BoxRecord

log = logging.getLogger(__name__)

STOP_GRACE_S = 6.0  # nspawn's SIGTERM to the box's init, whose own grace is 3 s
# systemd as PID 1 stops its units on SIGRTMIN+3, then cannot reboot() without CAP_SYS_BOOT and waits to be
# killed (Docker's boxes: the engine's grace, 2 s): killed after this.
STOP_GRACE_SYSTEMD_S = 2.5
PROPAGATE = Path("/run/systemd/nspawn/propagate")
SEEDED_AT_BOOT = (
    "/etc/hosts",
    "/etc/resolv.conf",
)  # rewritten by the box's init at boot, as the seed has them  # nspawn leaves a directory per machine here


class NspawnSandbox:
    """A box found by its state directory (``state.py``)."""

    def __init__(
        self,
        directory: Path,
        record: BoxRecord,
        parents: ParentCgroups | None,
        reads: OpenWatcher | None = None,
        connection_in_box: bool = False,
        relay_netns: str = "",
        stop_grace_s: float | None = None,
    ) -> None:
        self.id = record.id
        self.name = record.name
        self._dir = directory
        self._record = record
        if parents is not None and record.cgroup_prefix and record.cgroup_prefix != parents.prefix:
            parents = ParentCgroups(parents.root, record.cgroup_prefix)  # a box of another sensor's backend
        self._parents = parents
        self._reads = reads
        self._monitor: asyncio.Task[None] | None = None
        self._connection_in_box = connection_in_box
        self._relay_netns = (
            relay_netns  # network.mode capture: the gateway's namespace, where off-loopback relays start
        )
        self._scopes: set[asyncio.Task[None]] = set()
        self._stop_grace_s = stop_grace_s or STOP_GRACE_S
        self._stopping = False

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def record(self) -> BoxRecord:
        return self._record

    @property
    def root(self) -> Path:
        return self._dir / "root"

    @property
    def features(self) -> Features:
        return Features(
            login_scopes=self._parents is not None and bool(self._record.cgroup),
            connection_in_box=self._connection_in_box,
            box_ports=True,
        )

    def _same_box(self) -> bool:
        return state.is_alive(self._record.init_pid, self._record.init_start)

    def is_alive(self) -> bool:
        """Its PID 1 is still the one it was started with (no waiting, no event loop: callable from a thread)."""
        return self._same_box()

    def _init_pid(self) -> int:
        if not self._same_box():
            raise SandboxError(f"box {self.name} is not running")
        return self._record.init_pid

    # -- processes

    async def exec(
        self,
        argv: Argv,
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: Login | None = None,
    ) -> broker.BrokerProcess:
        pid = self._init_pid()
        plan: relay.RelayPlan | None = None
        if login is not None and login.client is not None and self._connection_in_box:
            address = self._record.address
            if address and self._relay_netns:  # capture: the client's connection arrives from the gateway
                planned = relay.plan(login.client, address, "", self._relay_netns, login.client.server_port)
            else:  # a loopback client: inside the box
                planned = relay.plan(login.client, "", "sandbox.network is none")
            if isinstance(planned, str):
                relay.note(planned)
            else:
                plan = planned
        try:
            proc = await broker.start(pid, self._same_box, argv, env or {}, user, workdir or "", tty, plan)
        except OSError as exc:
            raise SandboxError(f"box {self.name}: {exc!r}") from exc
        if login is not None and login.session_id is not None and self.features.login_scopes:
            # the login's scope, as pam_systemd makes it (the session helper waits for it)
            task = asyncio.get_running_loop().create_task(self._enter_scope(login.session_id, login.uid))
            self._scopes.add(task)
            task.add_done_callback(self._scopes.discard)
        return proc

    async def _enter_scope(self, session_id: int, uid: int) -> None:
        """Move the login's processes to ``user.slice/user-<uid>.slice/session-<n>.scope`` below the box's cgroup;
        a failure costs realism, never the session."""
        if self._parents is None or not self._record.cgroup:
            return
        unit = f"user.slice/user-{uid}.slice/session-{session_id}.scope"
        marker = f"XDG_SESSION_ID={session_id}".encode()
        try:
            moved = await asyncio.to_thread(
                self._parents.join, self._record.cgroup, launch.BOX_CGROUP, unit, marker, 0.25, launch.INNER_CGROUPS
            )
        except (OSError, ValueError) as exc:
            log.debug("session scope %s not entered: %s", unit, exc)
            return
        if not moved:
            log.debug("session scope %s: no process of the login found", unit)

    async def open_port(
        self, port: int, transport: Transport = "tcp", client: ClientAddress | None = None
    ) -> socket.socket:
        pid = self._init_pid()
        return await netns.in_box_netns(
            pid,
            self._same_box,
            lambda: relay.connect_port(port, transport, client),
            f"the box's {transport} port {port}",
            relay.CONNECT_TIMEOUT_S + 1,
        )

    async def network_address(self) -> str:
        """Its eth0's address on the capture gateway (network.mode capture); '' (none: lo only)."""
        return self._record.address

    # -- files

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        """Written by the box's own shell (never by the host into a tree the box controls: links)."""
        when = mtime if mtime is not None else time.time()
        script = 'cat > "$1" && chown 0:0 "$1" && chmod "$2" "$1" && touch -c -d "@$3" "$1"'
        result = await run(self, ["sh", "-c", script, "sh", path, f"{mode & 0o7777:o}", f"{when:.6f}"], data)
        if not result.ok:
            raise SandboxError(f"writing {path!r} failed: {result.stderr.decode(errors='replace')[:200]}")

    def _mounted(self) -> None:
        if not mounts.is_mounted(self.root):
            raise SandboxError(f"box {self.name}: its file system is not mounted (removed, or the host restarted)")

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        """Read on the host from the overlay (running or stopped), never following the box's links out of it."""
        await asyncio.to_thread(self._mounted)
        try:
            return await asyncio.to_thread(hostfs.read_file, str(self.root), path, max_bytes, None)
        except (hostfs.NeedEngine, OSError) as exc:
            raise SandboxError(f"reading {path!r} in {self.name}: {exc}") from exc

    async def snapshot(self) -> Snapshot:
        """The paths that differ from the tree (the seed's files count as the image's), with their metadata."""
        return Snapshot(await self._states())

    async def changed_files(self, since: Snapshot | None = None) -> list[ChangedFile]:
        """The overlay's upper directory against ``since``, else against its lower layers."""
        states = await self._states()
        if since is not None:
            return diff_snapshots(since, Snapshot(states))
        return [ChangedFile(p, "D" if s == GONE else "A" if s[0] == "A" else "C") for p, s in states.items()]

    async def _states(self) -> dict[str, str]:
        await asyncio.to_thread(self._mounted)
        lowers = [str(self._dir / "seed"), self._record.tree]
        try:
            found = await asyncio.to_thread(hostfs.upper_states, str(self._dir / "disk" / "upper"), lowers)
            return {p: st for p, st in found.items() if not await asyncio.to_thread(self._as_seeded, p, st)}
        except OSError as exc:
            raise SandboxError(f"changed files of {self.name}: {exc}") from exc

    def _as_seeded(self, path: str, state: str) -> bool:
        """A file init rewrites at boot (/etc/hosts, /etc/resolv.conf) still holding the seed's bytes: no change
        (an attacker's edit still shows)."""
        if not state.startswith("C") or path not in SEEDED_AT_BOOT:
            return False
        seed = hostfs.read_file(str(self._dir / "seed"), path, 1 << 16, None)
        upper = hostfs.read_file(str(self._dir / "disk" / "upper"), path, 1 << 16, None)
        return seed is not None and upper is not None and seed.data is not None and seed.data == upper.data

    async def watch_reads(self, paths: Sequence[str], report: ReadReport) -> OpenWatch | None:
        if self._reads is None or not self._same_box():
            return None
        return self._reads.watch(self.root, paths, report)

    # -- life

    async def claim(self, session: str, src_ip: str) -> None:
        if not self._same_box():
            raise SandboxError(f"box {self.name} is not running")
        self._record.session, self._record.src_ip = session, src_ip
        self._record.state, self._record.acquired = "active", BoxRecord.now()
        await asyncio.to_thread(state.save, self._dir, self._record)

    async def is_running(self) -> bool:
        return self._same_box()

    def watch_nspawn(self) -> None:
        """When systemd-nspawn ends (killed), the box ends too: its PID 1 would live on without it."""
        if self._monitor is None:
            self._monitor = asyncio.get_running_loop().create_task(self._follow_nspawn())

    async def _follow_nspawn(self) -> None:
        r = self._record
        try:
            fd = os.pidfd_open(r.nspawn_pid)
        except OSError:
            fd = -1
        try:
            if fd >= 0 and state.is_alive(r.nspawn_pid, r.nspawn_start):
                gone: asyncio.Future[None] = asyncio.get_running_loop().create_future()

                def ended() -> None:
                    if not gone.done():
                        gone.set_result(None)

                asyncio.get_running_loop().add_reader(fd, ended)
                try:
                    await gone
                finally:
                    asyncio.get_running_loop().remove_reader(fd)
            if self._same_box():
                # While stopping, systemd as PID 1 outlives nspawn (it cannot reboot() without CAP_SYS_BOOT)
                level = logging.DEBUG if self._stopping else logging.WARNING
                log.log(level, "box %s: systemd-nspawn (pid %d) ended; killing the box", self.name, r.nspawn_pid)
                self._kill_init()
        finally:
            if fd >= 0:
                os.close(fd)

    def kill_now(self) -> None:
        """SIGKILL the box's PID 1, systemd-nspawn and whatever else is in the box's cgroup, without waiting (a
        box whose PID 1 is not known yet, a create cancelled early, still goes: nspawn's death alone would leave
        it running)."""
        self._kill_init()
        r = self._record
        if state.is_alive(r.nspawn_pid, r.nspawn_start):
            with contextlib.suppress(OSError):
                os.kill(r.nspawn_pid, signal.SIGKILL)
        self._kill_cgroup()

    def _kill_cgroup(self) -> int:
        """SIGKILL every process in the box's parent cgroup (pids hierarchy): only the box and its nspawn are
        there. Returns how many were signalled."""
        if self._parents is None or not self._record.cgroup:
            return 0
        top = self._parents.root / "pids" / self._parents.prefix / self._record.cgroup
        killed = 0
        for directory, _, _ in os.walk(top):
            try:
                pids = [int(p) for p in (Path(directory) / "cgroup.procs").read_text().split()]
            except (OSError, ValueError):
                continue
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
                    killed += 1
        return killed

    def _kill_init(self) -> None:
        if self._same_box():  # SIGKILL to a PID namespace's init kills every process in it
            with contextlib.suppress(OSError):
                os.kill(self._record.init_pid, signal.SIGKILL)

    async def _wait_gone(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        r = self._record
        while self._same_box() or state.is_alive(r.nspawn_pid, r.nspawn_start):
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        """SIGTERM to nspawn (the box's init stops everything), SIGKILL after the grace; the file system stays
        mounted for forensics; the parent cgroup goes. Harmless twice."""
        r = self._record
        self._stopping = True
        if state.is_alive(r.nspawn_pid, r.nspawn_start):
            with contextlib.suppress(OSError):
                os.kill(r.nspawn_pid, signal.SIGTERM)
        elif self._same_box():
            with contextlib.suppress(OSError):
                os.kill(r.init_pid, signal.SIGTERM)
        if not await self._wait_gone(self._stop_grace_s):
            log.info("box %s did not stop within %.1fs: killing it", self.name, self._stop_grace_s)
            self.kill_now()
            await self._wait_gone(10.0)
        if await asyncio.to_thread(self._kill_cgroup):  # a box whose PID 1 was never recorded, or a straggler
            log.info("box %s: processes left in its cgroup after the stop were killed", self.name)
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
            self._monitor = None
        await self._drop_parent()
        if r.state != "preserved" and self._dir.exists():
            r.state, r.released = "preserved", BoxRecord.now()
            await asyncio.to_thread(state.save, self._dir, r)

    async def _drop_parent(self) -> None:
        if self._parents is None or not self._record.cgroup:
            return
        for _ in range(30):
            if await asyncio.to_thread(self._parents.remove, self._record.cgroup):
                return
            await asyncio.sleep(0.1)
        log.warning("box %s: its parent cgroup %s is not empty yet", self.name, self._record.cgroup)

    async def remove(self) -> None:
        """Stop, unmount and delete the box's state directory; harmless when gone."""
        await self.stop()
        left = await asyncio.to_thread(mounts.unmount_box, self._dir)
        if left:
            raise SandboxError(f"box {self.name}: still mounted after umount: {', '.join(left)}")
        await asyncio.to_thread(shutil.rmtree, self._dir, True)
        with contextlib.suppress(OSError):
            await asyncio.to_thread((PROPAGATE / self.name).rmdir)
