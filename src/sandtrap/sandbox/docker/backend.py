"""Docker backend: hardened containers driven through aiodocker (asyncio-native, no threads).

aiodocker over docker-py: every engine call (exec streams included) stays on the SSH event loop
without a thread per stream, and its exec stream has flow control (a bounded queue that pauses the
socket), which gives the bridge back-pressure for free.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import ClassVar

from sandtrap.config import DockerSettings, SandboxSettings
from sandtrap.config.engine import REMOTE_DISK_QUOTA
from sandtrap.errors import ConfigError, SandboxError, SandboxUnavailable
from sandtrap.sandbox.base import SandboxInfo, run
from sandtrap.sandbox.docker import engine, network
from sandtrap.sandbox.docker.disk import DiskWatch, upper_dir
from sandtrap.sandbox.docker.hostview import BoxHost
from sandtrap.sandbox.docker.sandbox import DockerSandbox
from sandtrap.sandbox.docker.spec import (
    LABEL_MANAGED,
    LABEL_SENSOR,
    LABEL_SESSION,
    LABEL_SRC_IP,
    SYSTEMD_CGROUP,
    box_labels,
    box_name,
    create_config,
    files_archive,
    safe_name,
    seed_archive,
)
from sandtrap.sandbox.host import relay, systemd_cgroups
from sandtrap.sandbox.host.cgroups import CgroupError, Limits, ParentCgroups, cpuset_for
from sandtrap.sandbox.host.procviews import ProcViews
from sandtrap.sandbox.personas import Persona

log = logging.getLogger(__name__)


def init_transport_refused(d: DockerSettings, s: SandboxSettings) -> str:
    """Why logins cannot be started by the box's listener (``sandbox.session_transport: init``), or ''."""
    if s.session_transport != "init":
        return "session_transport is exec"
    if not engine.is_local(d):
        return f"the engine at {engine.address(d)} is not on this host (sandbox.docker.docker_host)"
    if os.geteuid() != 0:
        return "the honeypot does not run as root (entering a box's network namespace needs it)"
    return ""


class DockerBackend:
    """Creates hardened containers for one sensor and finds those a previous run left.

    ``docker`` is its own section (``sandbox.docker``); ``box`` the ``sandbox`` section, read only for what every
    backend has (the box's name, limits, network, init, transport, host views). ``files`` (path relative to / -> content, mode, mtime) are written into every box before its init
    runs: the sensor's SSH host keys (``sandbox.share_host_keys``)."""

    # Per engine address: the open-files hard limit the engine was last seen to grant (see create); what one
    # backend learned, the next in this process starts from instead of probing again.
    _nofile_learned: ClassVar[dict[str, int]] = {}

    def __init__(
        self,
        docker: DockerSettings,
        box: SandboxSettings,
        sensor: str,
        seccomp: str | None,
        files: Mapping[str, tuple[bytes, int, float]] | None = None,
        attach: Callable[[int], Awaitable[str]] | None = None,
        relay_netns: str = "",
        persona_files: Mapping[str, Mapping[str, tuple[bytes, int, float]]] | None = None,
    ) -> None:
        """``seccomp``: the profile's JSON text, read once (``seccomp.resolve``); None = the engine's default.
        ``attach``: with ``network.mode: capture``, gives the box whose pid 1 is that host pid its ``eth0`` on the
        capture gateway (:meth:`sandtrap.network.gateway.Gateway.attach`); its address."""
        self._attach = attach
        self._relay_netns = relay_netns  # the gateway's namespace (a path), where off-loopback relays start
        self._docker = docker
        self._box = box
        self._sensor = sensor
        self._seccomp = seccomp
        self._planted = files_archive(files) if files else b""
        # A persona's own planted files instead (its host keys commented with its hostname), by persona name.
        self._planted_for = {name: files_archive(f) for name, f in (persona_files or {}).items() if f}
        url = engine.address(docker)
        local = engine.is_local(docker)
        if docker.disk_quota and not local:  # DOCKER_HOST names it (the config refuses a tcp:// docker_host)
            raise ConfigError(REMOTE_DISK_QUOTA.format(host=url))
        self._client = engine.connect(docker)
        self._host = BoxHost(self._client, sensor, local=local)
        if local:
            self._views = ProcViews(box.lxcfs_dir, box.loadavg_dir)
        else:  # binds name the engine host's paths: this host cannot see what is mounted there
            self._views = ProcViews("", "")
            if box.lxcfs_dir or box.loadavg_dir:
                log.warning(
                    "sandbox.lxcfs_dir and sandbox.loadavg_dir are off: the engine at %s is not on this host, "
                    "so boxes show its kernel's /proc files (meminfo, cpuinfo, loadavg)",
                    url,
                )
            log.warning(
                "remote engine %s (TLS: %s): nothing of a box is seen on this host: changed files and artifacts "
                "through the engine; no honeytoken read events (inotify needs the box's files here); no box ports "
                "(tcp/udp services); logins through the engine's exec; limits on each container (limits_in_parent), no "
                "systemd init, no mask_cgroupns (see README 'Remote engine')",
                url,
                "yes" if docker.uses_tls and docker.docker_host else "no",
            )
        if docker.uses_tls and not docker.tls_verify:
            log.warning(
                "sandbox.docker.tls_verify is false: whoever answers at %s is taken for the engine (and gets what "
                "sandtrap sends it); set tls_ca and tls_verify: true",
                url,
            )
        # The disk bound (sandbox.docker.disk_quota): the writable layers are measured on this host.
        self.disk: DiskWatch | None = None
        if docker.disk_quota:
            self.disk = DiskWatch(docker.disk_quota, docker.disk_files_max, docker.disk_check_s)
            self._host.stopped.append(self.disk.forget)
        self._disk_unbounded_said = False
        self._image_seed: dict[str, tuple[bytes, str]] = {}  # per image (personas may have their own)
        self._network_ready = False
        self._network_lock = asyncio.Lock()
        # Lowered if the engine cannot grant it (create); what one backend learned, the next starts from.
        self._nofile_hard = min(docker.ulimit_nofile_hard, self._nofile_learned.get(docker.docker_host, 1 << 30))
        # Where limits go and how many CPUs the engine's host has: decided once, from the engine's info.
        self._placement_lock = asyncio.Lock()
        self._placed = False
        self._parents: ParentCgroups | None = None
        self._creating: set[str] = set()  # parents made but not yet holding their box: never swept
        self._cpu_list: list[int] = []  # the CPUs boxes may be pinned to
        self._mask_systemd_cgroup = False
        self._systemd = False  # sandbox.init: systemd, where this host allows it (decided with the placement)
        self._init_refused = init_transport_refused(docker, box)
        self._transparent_refused = "sandbox.network is none"  # until the host's rules are in place
        if box.session_transport == "init" and self._init_refused:
            log.warning(
                "logins by docker exec, not by the box's listener (sandbox.session_transport: init): %s",
                self._init_refused,
            )

    @property
    def docker(self) -> DockerSettings:
        return self._docker

    @property
    def box(self) -> SandboxSettings:
        return self._box

    @property
    def nofile_hard(self) -> int:
        """The open-files hard limit boxes get: ``ulimit_nofile_hard``, or less where the engine cannot grant it."""
        return self._nofile_hard

    async def _ensure_network(self) -> None:
        if self._box.network != "internal" or self._network_ready:
            return
        async with self._network_lock:
            if not self._network_ready:
                bridge = await network.ensure_network(self._client, self._docker.network_name, self._box.network_subnet)
                if self._box.connection_in_box and not self._init_refused:
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
            s, d = self._box, self._docker
            # A local engine (a unix socket): its host is this one; its info is not needed (and the engine
            # proxy, a local socket too, does not pass GET /info on). A remote one: CPUs from its info.
            local = self._host.local
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
                d.mask_cgroupns
                and d.cgroupns == "private"
                and v1
                and await asyncio.to_thread(Path(SYSTEMD_CGROUP).is_dir)
            )
            if s.init == "systemd":
                reason = systemd_cgroups.unavailable(local, v1, d.cgroupns, self._mask_systemd_cgroup)
                self._systemd = True
                if reason:
                    self._no_systemd(reason)
            if d.limits_in_parent:
                parents = ParentCgroups(prefix=f"sandtrap-{safe_name(self._sensor)}")
                reason = parents.available() if local else f"the engine at {engine.address(d)} is not on this host"
                if reason:
                    log.warning(
                        "sandbox limits stay on each container, where a box sees them at its root cgroup "
                        "(sandbox.docker.limits_in_parent: %s)",
                        reason,
                    )
                else:
                    self._parents = parents
                    swept = await asyncio.to_thread(parents.sweep, set(self._creating))
                    if swept:
                        log.info("removed %d parent cgroups of boxes that are gone", swept)
            if self._systemd and self._parents is None:
                self._no_systemd("its cgroups are handed over from a per-box parent cgroup, and boxes have none")
            self._placed = True

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> DockerSandbox:
        """A started box (a warm one without a session). A box's open-files hard limit cannot exceed the engine's own (runc sets it without
        CAP_SYS_RESOURCE): when the engine refuses ``ulimit_nofile_hard``, halve it (down to the soft limit)
        until it starts, and keep that value for the boxes that follow."""
        labels = box_labels(self._sensor, session, src_ip, persona=persona.name if persona else "")
        name = box_name(self._sensor, session)
        while True:
            tried = self._nofile_hard
            try:
                return await self._create(labels, name, tried, persona)
            except engine.LimitRefused:
                soft = self._docker.ulimit_nofile
                if tried <= soft:
                    raise
                if tried == self._nofile_hard:
                    self._nofile_hard = max(soft, tried // 2)
                    self._nofile_learned[self._docker.docker_host] = self._nofile_hard
                    log.warning(
                        "the engine cannot give sandboxes an open-files hard limit of %d (its own is lower; raise "
                        "LimitNOFILE of containerd and docker, or lower sandbox.docker.ulimit_nofile_hard): trying %d",
                        tried,
                        self._nofile_hard,
                    )

    async def _create(
        self, labels: Mapping[str, str], name: str, nofile_hard: int, persona: Persona | None = None
    ) -> DockerSandbox:
        await self._ensure_network()
        await self._placement()
        box, docker = self._box, self._docker
        if nofile_hard != docker.ulimit_nofile_hard:
            docker = docker.model_copy(update={"ulimit_nofile_hard": nofile_hard})
        if persona is not None:  # its hostname and image over the sandbox section's
            box = box.model_copy(update={"hostname": persona.hostname, "domain": persona.domain})
            if persona.image and persona.image != docker.image:
                docker = docker.model_copy(update={"image": persona.image})
        planted = self._planted_for.get(persona.name, self._planted) if persona is not None else self._planted
        cgroup = secrets.token_hex(6) if self._parents is not None else ""
        cpuset = cpuset_for(cgroup or name, box.cpus, self._cpu_list) if docker.pin_cpus else ""
        self._creating.add(cgroup)
        try:
            parent = ""
            if self._parents is not None:
                limits = Limits(box.memory, box.memory_swap or box.memory, box.cpus, box.pids_limit)
                try:
                    parent = await asyncio.to_thread(self._parents.create, cgroup, limits)
                except CgroupError as exc:
                    raise SandboxError(f"cannot make the box's parent cgroup: {exc}") from exc
            config = create_config(
                docker,
                box,
                labels,
                self._seccomp,
                parent,
                cpuset,
                self._mask_systemd_cgroup,
                self._systemd,
                await asyncio.to_thread(self._views.binds),
            )
            try:
                container = await engine.call(
                    "create container", self._client.containers.create(config, name=name), box.start_timeout_s
                )
            except BaseException as exc:
                if self._parents is not None:
                    self._parents.remove(cgroup)
                if parent and isinstance(exc, engine.CgroupParentRefused):
                    # e.g. the systemd cgroup driver, which takes only `*.slice` parents
                    self._no_parents(f"the engine refused the parent cgroup: {exc}")
                    return await self._create(labels, name, nofile_hard, persona)
                if self._systemd and isinstance(exc, engine.Forbidden):
                    # e.g. the engine proxy, which refuses what systemd needs (CAP_SETPCAP) as a parent cgroup
                    self._no_systemd(f"the engine refused the container systemd needs: {exc}")
                    return await self._create(labels, name, nofile_hard, persona)
                raise
            sandbox = DockerSandbox(self._host, container.id, name, tuple(docker.tmpfs))
            sandbox.cgroup, sandbox.parents = cgroup, self._parents
            self._share_relay(sandbox)
            seeded = docker.read_only_root and bool(docker.writable)
            try:
                if planted and not seeded:  # in the container's own layer, before init starts sshd
                    await engine.call("plant files", container.put_archive("/", planted), 30)  # type: ignore[no-untyped-call]
                await engine.call("start container", container.start(), box.start_timeout_s)
                if parent and not await self._check_placement(sandbox, parent):
                    await asyncio.shield(sandbox.remove())
                    self._no_parents(f"box {name} did not start below its parent cgroup {parent}")
                    return await self._create(labels, name, nofile_hard, persona)
                if self._attach is not None:
                    await self._link(sandbox)
                if seeded:
                    await self._seed(sandbox, docker, planted)
                if self._systemd:
                    await self._start_systemd(sandbox, parent)
                await self._bound_disk(sandbox)
            except BaseException:
                await asyncio.shield(sandbox.remove())
                raise
            return sandbox
        finally:
            self._creating.discard(cgroup)

    async def _bound_disk(self, sandbox: DockerSandbox) -> None:
        """Watch the box's writable layer (sandbox.docker.disk_quota)."""
        if self.disk is None:
            return
        upper = await upper_dir(sandbox)
        if upper:
            self.disk.watch(sandbox, upper)
        elif not self._disk_unbounded_said:
            self._disk_unbounded_said = True
            log.warning("sandbox.docker.disk_quota is not enforced: the engine's storage shows no upper dir here")

    async def _link(self, sandbox: DockerSandbox) -> None:
        """The box's eth0 on the capture gateway (network.mode: capture)."""
        assert self._attach is not None
        view = await sandbox._host_view()
        if view is None:
            raise SandboxError(f"box {sandbox.name}: its pid 1 is not visible on this host (network.mode: capture)")
        sandbox.captured_address = await self._attach(view.pid)
        sandbox.relay_netns = self._relay_netns

    async def _start_systemd(self, sandbox: DockerSandbox, parent: str) -> None:
        """Hand the box its cgroups (its init then execs systemd) and wait until systemd has started the listener
        (ssh.service), 10 s at most. When the hand-over fails, its init goes on as sandtrap's."""
        view = await sandbox._host_view()
        if view is None:
            log.warning("box %s keeps sandtrap's init: its pid 1 is not visible on this host", sandbox.name)
            return
        await systemd_cgroups.boot(view.pid, view.mnt_ns, sandbox.name, view.verify, sandbox.id, parent)

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

    async def _seed(self, sandbox: DockerSandbox, docker: DockerSettings, planted: bytes) -> None:
        """Fill the writable tmpfs mounts with the image's files (owners, modes and times kept), then tell
        init, which waits for them before it starts the box's daemons."""
        if docker.image not in self._image_seed:
            self._image_seed[docker.image] = await self._image_files(docker)
        data, fix_roots = self._image_seed[docker.image]
        # --skip-old-files: what the box's init wrote at boot (/etc/machine-id) stays. The planted files
        # (host keys) then replace the image's in the fresh mounts, before init starts the daemons.
        script = f"tar -x -p --numeric-owner --skip-old-files -C / -f - && {fix_roots}"
        await self._run_with_input(sandbox, script, data, "seeding the writable mounts")
        if planted:
            await self._run_with_input(sandbox, "tar -x -p --numeric-owner -C / -f -", planted, "planting files")
        await self._run_with_input(sandbox, "kill -USR1 1", b"", "starting the daemons")  # init.c, wait_for_files
        sandbox.seeded_at = time.time()

    @staticmethod
    async def _run_with_input(sandbox: DockerSandbox, script: str, data: bytes, what: str) -> None:
        result = await run(sandbox, ["sh", "-c", script], data, max_output=4096)
        if result.status.code != 0:
            raise SandboxError(f"{what} failed ({result.status.code}): {result.stderr.decode(errors='replace')}")

    async def _image_files(self, d: DockerSettings) -> tuple[bytes, str]:
        """The image's files under each writable path, read once from a container that never starts."""
        labels = box_labels(self._sensor, role="template")
        config = create_config(d.model_copy(update={"read_only_root": False}), self._box, labels, self._seccomp)
        name = f"sandtrap-{safe_name(self._sensor)}-t-{secrets.token_hex(4)}"
        template = await engine.call("create template", self._client.containers.create(config, name=name))
        try:
            parts = {p: await engine.call(f"read {p} from the image", template.get_archive(p)) for p in d.writable}
        finally:
            await asyncio.shield(DockerSandbox(self._host, template.id, name).remove())
        return seed_archive(parts)

    def sandbox(self, container_id: str, name: str) -> DockerSandbox:
        sandbox = DockerSandbox(self._host, container_id, name, tuple(self._docker.tmpfs))
        self._share_relay(sandbox)
        return sandbox

    def _share_relay(self, sandbox: DockerSandbox) -> None:
        """What the backend knows about the transport and the login's connection, given to one of its boxes."""
        sandbox.init_refused = self._init_refused
        sandbox.connection_in_box = self._box.connection_in_box
        sandbox.transparent_refused = self._transparent_refused
        sandbox.telnet_in_box = self._box.telnet_in_box

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
        return engine.parse_docker_time((info.get("State") or {}).get("FinishedAt") or "")

    async def ping(self) -> None:
        try:
            await engine.call("ping", self._client.version(), 5)
        except SandboxUnavailable as exc:
            better = await engine.explained(self._docker, exc)
            if better is exc:
                raise
            raise better from exc

    async def close(self) -> None:
        if self._parents is not None:  # parents of boxes that are gone, and the sensor's directory if empty
            await asyncio.to_thread(self._parents.sweep, set(self._creating), True)
        # Exec streams still open (a task cancelled mid-session at shutdown) go back before the client does.
        for proc in list(self._host.open_processes):
            await proc.kill()
        self._host.reads.close()
        if self.disk is not None:
            await self.disk.close()
        await engine.close(self._client)
