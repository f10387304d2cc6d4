"""A Docker container as a :class:`~sandtrap.sandbox.base.Sandbox`: logins by the box's listener or ``docker
exec``, files read on this host where the engine's storage is (else through the engine), changes from the
overlay's upper directory."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import secrets
import socket
import tarfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiodocker

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import (
    GONE,
    TELNET_PORT,
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
    stat_in_box,
    state_of,
)
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.hostview import BoxHost, HostView, inspect_address
from sandtrap.sandbox.docker.process import PID_ANNOUNCE, DockerProcess
from sandtrap.sandbox.docker.spec import CHANGE_KIND, ENGINE_FILES, box_name
from sandtrap.sandbox.host import boxports, broker, hostfs, netns, relay, telnet
from sandtrap.sandbox.host.cgroups import ParentCgroups
from sandtrap.sandbox.host.inotify import OpenWatch

log = logging.getLogger(__name__)


class DockerSandbox:
    """A container of this sensor. Its backend shares with it what it knows of the host (``host``)."""

    def __init__(self, host: BoxHost, container_id: str, name: str, tmpfs: tuple[str, ...] = ()) -> None:
        self._box_host = host
        self._client = host.client
        self.id = container_id
        self.name = name
        self._tmpfs = tmpfs  # the engine's archive API cannot see into these mounts
        self._scopes: set[asyncio.Task[None]] = set()  # logins being moved into their scope
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
        self.captured_address = ""  # its eth0's address on the capture gateway (network.mode: capture)
        self.relay_netns = ""  # network.mode capture: the gateway's namespace, where off-loopback relays start
        self.telnet_in_box = False  # a telnet service is configured: inetd on :23 from the box's claim on

    async def _host_view(self) -> HostView | None:
        """The box's files on this host, looked up once (None: use the engine; always for a remote engine, whose
        pids and paths are its host's, never this one's)."""
        if not self._box_host.local:
            return None
        if not self._host_checked:
            try:
                info = await engine.call("inspect", self._container().show(), 10)
            except SandboxError:
                return None
            self._host, self._host_checked = HostView.from_inspect(info), True
        return self._host

    def _container(self) -> aiodocker.containers.DockerContainer:
        return self._client.containers.container(self.id)

    @property
    def features(self) -> Features:
        return Features(
            login_scopes=self.parents is not None and bool(self.cgroup),
            connection_in_box=self.connection_in_box and not self.init_refused,
            box_ports=self._box_host.local,
        )

    async def open_port(
        self, port: int, transport: Transport = "tcp", client: ClientAddress | None = None
    ) -> socket.socket:
        """A socket to the box's ``port``: from the client's own address to the box's eth0 for a client off loopback
        whose service answers there (:func:`sandtrap.sandbox.host.boxports.open_as_client`), else to its 127.0.0.1 from inside its network namespace
        (see :func:`sandtrap.sandbox.host.relay.connect_port`), on a thread of netns.py's."""
        view = await self._host_view()
        if view is not None and not view.verify():  # the box restarted: its pid 1 is another process now
            self._host_checked = False
            view = await self._host_view()
        if view is None:
            raise SandboxError(f"{self.name}: the box's network namespace is not visible on this host")
        if client is not None and self.connection_in_box and not relay.is_loopback(client.ip):
            box_address = self.captured_address or view.address
            gateway = self.relay_netns if self.captured_address else ""  # network.mode capture: from its namespace
            refused = "" if gateway else self.transparent_refused
            route = boxports.Route(view.pid, view.verify, box_address, refused, gateway)
            sock = await boxports.open_as_client(route, port, transport, client, self.name)
            if sock is not None:
                return sock
        return await netns.in_box_netns(
            view.pid,
            view.verify,
            lambda: relay.connect_port(port, transport, client),
            f"the box's {transport} port {port}",
            relay.CONNECT_TIMEOUT_S + 1,
        )

    async def exec(
        self,
        argv: Argv,
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: Login | None = None,
    ) -> DockerProcess | broker.BrokerProcess:
        proc = await self._start(argv, tty, env, user, workdir, login)
        if login is not None and login.session_id is not None and self.features.login_scopes:
            # the login's scope, as pam_systemd makes it (the session helper waits for it)
            task = asyncio.get_running_loop().create_task(self._enter_scope(login.session_id, login.uid))
            self._scopes.add(task)
            task.add_done_callback(self._scopes.discard)
        return proc

    async def _start(
        self,
        argv: Argv,
        tty: TermSize | None,
        env: Mapping[str, str] | None,
        user: str,
        workdir: str | None,
        login: Login | None,
    ) -> DockerProcess | broker.BrokerProcess:
        if login is not None and not self.init_refused:
            started = await self._start_by_init(argv, tty, env, user, workdir, login.client)
            if started is not None:
                return started
        container = self._container()
        cmd = [a.decode("utf-8", "replace") if isinstance(a, bytes) else a for a in argv]  # the API takes text
        # A remote engine's exec cannot be killed from here (its pid is the engine host's): without a TTY (whose
        # hang-up ends it), it tells its pid in the box first, on stderr (DockerProcess takes the line out).
        announces = not self._box_host.local and tty is None
        if announces:
            cmd = ["/bin/sh", "-c", PID_ANNOUNCE, "sh", *cmd]
        execution = await engine.call(
            "exec create",
            container.exec(
                cmd=cmd,
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
        proc = DockerProcess(
            execution, stream, tty is not None, self._box_host.local, self._kill_in_box if announces else None
        )
        self._box_host.open_processes.add(proc)
        if tty is not None:
            await proc.resize(tty)
        return proc

    async def _kill_in_box(self, pid: int) -> None:
        """SIGKILL to a process of the box by its pid there (a remote engine's exec, see ``_start``)."""
        killer = await engine.call(
            "exec create",
            self._container().exec(cmd=["kill", "-KILL", str(pid)], stdout=False, stderr=False, user="root"),
            10,
        )
        await engine.call("exec start", killer.start(detach=True), 10)

    async def _start_by_init(
        self,
        argv: Argv,
        tty: TermSize | None,
        env: Mapping[str, str] | None,
        user: str,
        workdir: str | None,
        client: ClientAddress | None = None,
    ) -> broker.BrokerProcess | None:
        """The process started by the box's listener (see :mod:`sandtrap.sandbox.host.broker`), or None (logged) when
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
            if self.captured_address and self.relay_netns:
                planned = relay.plan(client, self.captured_address, "", self.relay_netns, client.server_port)
            else:
                planned = relay.plan(client, view.address, self.transparent_refused, "", client.server_port)
            if isinstance(planned, str):
                relay.note(planned)
            else:
                plan = planned
        if client is not None and client.server_port == TELNET_PORT:
            started = await telnet.start(view.pid, view.verify, argv, env or {}, user, workdir or "", tty, plan)
            if started is not None:
                return started
            plan = None  # sshd's listener, as before inetd: no connection on :23 to show
        try:
            return await broker.start(view.pid, view.verify, argv, env or {}, user, workdir or "", tty, plan)
        except broker.BrokerError as exc:
            log.warning("login in %s by docker exec: the box's listener failed (%s)", self.name, exc)
        except OSError as exc:
            log.warning("login in %s by docker exec: %r", self.name, exc)
        return None

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        when = mtime if mtime is not None else time.time()
        if self._in_tmpfs(path):  # the engine's archive API writes below a tmpfs mount, where the box sees nothing
            script = 'cat > "$1" && chmod "$2" "$1" && touch -c -d "@$3" "$1"'
            result = await run(self, ["sh", "-c", script, "sh", path, f"{mode & 0o7777:o}", f"{when:.6f}"], data)
            if not result.ok:
                raise SandboxError(f"writing {path!r} failed: {result.stderr.decode(errors='replace')[:200]}")
            return
        p = Path(path)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            info = tarfile.TarInfo(p.name)
            info.size = len(data)
            info.mode = mode
            info.mtime = int(when)
            tar.addfile(info, io.BytesIO(data))
        await engine.call("put archive", self._container().put_archive(str(p.parent), buf.getvalue()))  # type: ignore[no-untyped-call]

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        view = await self._host_view()
        if view is not None:
            try:
                return await asyncio.to_thread(hostfs.read_file, view.root, path, max_bytes, view.verify)
            except (hostfs.NeedEngine, OSError) as exc:
                log.debug("reading %s from the host: %s; asking the engine", path, exc)
        if self._in_tmpfs(path):
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

    def _in_tmpfs(self, path: str) -> bool:
        return any(path == m or path.startswith(m.rstrip("/") + "/") for m in self._tmpfs)

    async def _read_by_exec(self, path: str, max_bytes: int) -> FileData | None:
        """Stat and read through the box's own tools (tmpfs mounts); content bounded by ``head -c``."""
        script = 'stat -L -c "%s %f" -- "$1" && if [ -f "$1" ]; then head -c "$2" -- "$1"; fi'
        result = await run(self, ["sh", "-c", script, "sh", path, str(max_bytes + 1)], max_output=max_bytes + 64)
        if result.status.code != 0 or b"\n" not in result.stdout:
            return None
        head, _, body = result.stdout.partition(b"\n")
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
        except engine.NotFound:
            return None

    async def snapshot(self) -> Snapshot:
        """The paths that differ from the image (cost follows what changed, not the image), with metadata."""
        return Snapshot(await self._states())

    async def changed_files(self, since: Snapshot | None = None) -> list[ChangedFile]:
        """What the box changed since ``since``, else since its image."""
        if since is not None:
            return diff_snapshots(since, Snapshot(await self._states()))
        states = await self._states()
        return [ChangedFile(p, "D" if s == GONE else "A" if s[0] == "A" else "C") for p, s in states.items()]

    async def _states(self) -> dict[str, str]:
        """Read on this host when its files are here, else through the engine."""
        view = None
        if self._box_host.local:
            info = await engine.call("inspect", self._container().show())
            view = HostView.from_inspect(info)
            self._host, self._host_checked = view, True
        if view is not None:
            try:
                return _files_only(await asyncio.to_thread(self._states_on_host, view))
            except (hostfs.NeedEngine, OSError) as exc:
                log.info("changed files from the host failed (%s); asking the engine", exc)
        return _files_only(await self._states_by_engine())

    def _states_on_host(self, view: HostView) -> dict[str, str]:
        out = hostfs.upper_states(view.upper, view.lowers)
        for mount in view.tmpfs:
            out |= hostfs.mount_states(view.root, mount, None, view.verify)
        for mount in view.volumes:
            found = hostfs.mount_states(view.root, mount, self.seeded_at, view.verify)
            out |= {p: "C" + s[1:] for p, s in found.items() if p.lstrip("/") not in ENGINE_FILES}
        return out

    async def _states_by_engine(self) -> dict[str, str]:
        """The engine's diff against the image, plus regular files in the tmpfs mounts it cannot see; each with
        its metadata, listed in the box."""
        raw = await engine.call("container changes", self._client._query_json(f"containers/{self.id}/changes"))
        kinds = {c["Path"]: CHANGE_KIND.get(c["Kind"], "C") for c in raw or []}
        info = await engine.call("inspect", self._container().show())
        running = info.get("State", {}).get("Running")
        tmpfs = sorted((info.get("HostConfig") or {}).get("Tmpfs") or {})
        if tmpfs and running:
            kinds |= dict.fromkeys(await self._find([*tmpfs, "-xdev", "-type", "f"]), "A")
        # The writable mounts of a read-only root: what changed after seeding (ctime cannot be set back).
        volumes = sorted(m["Destination"] for m in info.get("Mounts") or [] if m.get("Type") == "volume")
        if volumes and running:
            since = ["-newerct", f"@{self.seeded_at:.6f}"] if self.seeded_at is not None else []
            found = await self._find([*volumes, "-xdev", "-type", "f", *since])
            kinds |= {p: "C" for p in found if p.lstrip("/") not in ENGINE_FILES}
        present = [p for p, k in kinds.items() if k != "D"]
        metas = await stat_in_box(self, present) if running and present else {}
        return {p: GONE if k == "D" else state_of(k, metas.get(p, "?")) for p, k in kinds.items()}

    async def _find(self, args: list[str]) -> list[str]:
        result = await run(self, ["find", *args])
        return [line for line in result.stdout.decode("utf-8", "surrogateescape").splitlines() if line]

    async def watch_reads(self, paths: Sequence[str], report: ReadReport) -> OpenWatch | None:
        """Opens seen by inotify on the overlay's ``merged`` directory, when the engine's storage is on this host."""
        if not self._box_host.local:  # its MergedDir names a path on the engine's host
            return None
        try:
            info = await engine.call("inspect", self._container().show(), 10)
        except SandboxError:
            return None
        merged = ((info.get("GraphDriver") or {}).get("Data") or {}).get("MergedDir")
        if not merged:
            return None
        return self._box_host.reads.watch(Path(merged), paths, report)

    async def claim(self, session: str, src_ip: str) -> None:
        """Docker labels are immutable: a warm box takes the session into its name instead."""
        new = f"{box_name(self._box_host.sensor, session)}-{secrets.token_hex(2)}"
        await engine.call("rename", self._container().rename(new), 10)
        self.name = new
        # The engine renames a stopped container too: a warm box an engine restart stopped must not go to a session.
        if not await self.is_running():
            raise SandboxError(f"box {new} is not running")
        if self.telnet_in_box and not self.init_refused:  # :23 listening before any login, as on the server
            view = await self._host_view()
            if view is not None and view.verify():
                telnet.ask_inetd(view.pid, view.verify)

    async def is_running(self) -> bool:
        try:
            info = await engine.call("inspect", self._container().show(), 10)
        except engine.NotFound:
            return False
        return bool(info.get("State", {}).get("Running"))

    async def stop(self) -> None:
        try:
            await engine.call("stop", self._container().stop(t=2), 30)
        except (engine.NotFound, engine.NotModified):
            pass
        for told in self._box_host.stopped:
            told(self.id)
        await self._drop_parent()

    async def remove(self) -> None:
        try:
            await engine.call("remove", self._container().delete(force=True, v=True), 30)
        except (engine.NotFound, engine.Conflict):
            pass
        for told in self._box_host.stopped:
            told(self.id)
        await self._drop_parent()

    async def network_address(self) -> str:
        """The box's eth0 IPv4 address: the capture gateway's link (network.mode: capture), else the engine
        network's (internal), from the engine's inspect (cached); ''."""
        if self.captured_address:
            return self.captured_address
        if not self._box_host.local:  # a remote engine: its own network's address, from its inspect
            try:
                return inspect_address(await engine.call("inspect", self._container().show(), 10))
            except SandboxError:
                return ""
        view = await self._host_view()
        return view.address if view is not None else ""

    async def _enter_scope(self, session_id: int, uid: int) -> None:
        """Move the processes of login ``session_id`` (``XDG_SESSION_ID``) below the box's cgroup, where
        pam_systemd puts a login (``user.slice/user-<uid>.slice/session-<n>.scope``). Only with a parent
        cgroup (limits_in_parent); a failure costs realism, never the session."""
        if self.parents is None or not self.cgroup:
            return
        unit = f"user.slice/user-{uid}.slice/session-{session_id}.scope"
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


def _files_only(states: dict[str, str]) -> dict[str, str]:
    """Without the mount points the engine makes under /proc for lxcfs's views (an empty file in the upper dir
    on the host, lxcfs's file through the engine): never the box's own files."""
    return {p: st for p, st in states.items() if not p.startswith("/proc/")}
