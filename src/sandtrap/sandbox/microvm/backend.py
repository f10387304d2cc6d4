"""``sandbox.backend: microvm``: a QEMU VM per box, each in a network namespace of its own.

A VM is: a qcow2 overlay on the image's base disk, a QEMU started by ``unshare --net`` after a tap is made in
that new namespace (the namespace lives exactly as long as QEMU), and a state directory (``state.py``) that a
restarted honeypot finds it by. The honeypot reaches the guest's sshd from inside that namespace.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import posixpath
import secrets
import shutil
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path

import asyncssh

from sandtrap.config import ImageSettings, MicroVMSettings, SandboxSettings
from sandtrap.errors import SandboxError, SandboxUnavailable
from sandtrap.sandbox.base import SandboxInfo, run
from sandtrap.sandbox.host.cgroups import CgroupError
from sandtrap.sandbox.microvm import guest, prune, qemu, snapshot, state, virtiofs
from sandtrap.sandbox.microvm.image import GuestFiles, VMImage, find_image, vm_inputs
from sandtrap.sandbox.microvm.limits import VMCgroups, vm_limits
from sandtrap.sandbox.microvm.sandbox import BASELINE, LISTING, LISTING_TIMEOUT_S, MicroVMSandbox, copy_console
from sandtrap.sandbox.microvm.snapshot import Snapshot
from sandtrap.sandbox.microvm.state import VMRecord
from sandtrap.sandbox.microvm.unique import make_unique, new_identity
from sandtrap.sandbox.microvm.watch import VMWatch
from sandtrap.sandbox.personas import Persona

log = logging.getLogger(__name__)

NAME_PREFIX = "sandtrap-vm-"
TEMPLATE_PREFIX = "sandtrap-vmtpl-"  # not NAME_PREFIX's: a template is never a box (list_managed)
READY_POLL_S = 1.0
RESTORE_POLL_S = 0.1
SETTLE_S = 1.0
SAVE_ATTEMPTS = 3
WORK_PREFIX = ".work-"  # a template being made: <data_dir>/microvm/templates/.work-<id>/
# Walked again in a restored VM before it is handed out (the rest of its baseline is the template's listing).
FRESH_ROOTS = ("/etc/machine-id", "/var/log", "/var/lib/systemd", "/var/tmp", "/tmp", "/root", "/home")

Planted = dict[str, tuple[bytes, int, float]]


def access_key_path(root: Path) -> Path:
    return root / "access_ed25519"


def guest_files(sandbox: SandboxSettings, key: asyncssh.SSHKey, planted: Planted | None) -> GuestFiles:
    """What the image bakes in for this sensor (``sandtrap image build`` and the backend must agree)."""
    net = qemu.GuestNet.from_subnet(sandbox.network_subnet)
    return GuestFiles(
        hostname=sandbox.hostname,
        domain=sandbox.domain,
        address=f"{net.address}/{net.prefix}",
        gateway=net.gateway,
        access_key=key.export_public_key("openssh"),
        disk_bytes=sandbox.microvm.disk_size,
        planted=dict(planted or {}),
    )


def _mac() -> str:
    return "52:54:00:" + ":".join(f"{b:02x}" for b in secrets.token_bytes(3))  # QEMU's OUI, as libvirt picks


class MicroVMBackend:
    """:class:`~sandtrap.sandbox.base.SandboxBackend` for QEMU VMs. ``root``: this sensor's VM state
    (``<data_dir>/microvm``: the access key and one directory per VM under ``vms/``)."""

    def __init__(
        self,
        settings: MicroVMSettings,
        sandbox: SandboxSettings,
        image: ImageSettings,
        cache_dir: Path,
        root: Path,
        planted: Planted | None = None,
        on_start: Callable[[str, int], Awaitable[None]] | None = None,
    ) -> None:
        self._settings = settings
        self._root = Path(root)
        self._vms = self._root / "vms"
        self._vms.mkdir(parents=True, exist_ok=True)
        self._vms.chmod(0o700)
        self._templates = self._root / "templates"  # snapshot-<key16>/: the saved templates (snapshot.py)
        self._key = guest.load_access_key(access_key_path(self._root))
        self._guest = guest_files(sandbox, self._key, planted)
        self._net = qemu.GuestNet.from_subnet(sandbox.network_subnet)
        self._inputs = vm_inputs(image, self._guest)
        self._cache_dir = Path(cache_dir)
        qemu.check_user(settings)
        if settings.lure.enabled:
            virtiofs.check(settings.lure)  # SandboxUnavailable names sandbox.microvm.lure.*
        self._accel = qemu.choose_accel(settings.accel)  # SandboxUnavailable names sandbox.microvm.accel
        if self._accel.name == "tcg":
            log.warning("micro-VMs run under TCG: %s", self._accel.reason)
        else:
            log.info("micro-VMs run under KVM: %s", self._accel.reason)
        self._cgroups = VMCgroups()
        self._limits = vm_limits(settings, tcg=self._accel.name == "tcg")
        self._live: dict[str, MicroVMSandbox] = {}
        self._template_lock = asyncio.Lock()
        self._failed_templates: set[str] = set()
        self._qemu_version: str | None = None
        self._creating: set[str] = set()  # booting: not the pool's yet, and not a stray for its sweep
        self._on_start = on_start  # (vm id, QEMU's pid) after QEMU starts: the capture gateway (network/vmtap.py)

    @property
    def accel(self) -> qemu.Accel:
        return self._accel

    def image(self) -> VMImage:
        found = find_image(self._cache_dir, self._inputs)
        if found is None:
            raise SandboxUnavailable(
                f"the VM image for these settings ({self._inputs[:16]}) is not in {self._cache_dir}: "
                "run `sandtrap image build` (with sandbox.backend: microvm)"
            )
        return found

    async def ping(self) -> None:
        if shutil.which(self._settings.qemu) is None:
            raise SandboxUnavailable(
                f"sandbox.microvm.qemu: {self._settings.qemu} not found: apt-get install qemu-system-x86"
            )
        if shutil.which("qemu-img") is None:
            raise SandboxUnavailable("qemu-img not found: apt-get install qemu-utils")
        self.image()

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> MicroVMSandbox:
        """``persona`` is not used: every VM is the one image (config refuses personas here). A VM restored from the template's snapshot and made unique (the first create saves the template), or
        cold-booted where there is no snapshot (``sandbox.microvm.snapshot: false``) or restoring failed."""
        image = self.image()
        template = await self._template(image) if self._settings.snapshot else None
        sandbox: MicroVMSandbox | None = None
        if template is not None:
            try:
                sandbox = await self._boot(image, template)
            except (SandboxError, OSError) as exc:
                log.warning("restoring a VM from %s failed, cold boot instead: %s", template.directory.name, exc)
        if sandbox is None:
            sandbox = await self._boot(image, None)
        if session:
            try:
                await sandbox.claim(session, src_ip)
            except BaseException:
                await asyncio.shield(sandbox.remove())
                raise
        self._live[sandbox.id] = sandbox
        return sandbox

    async def _boot(self, image: VMImage, template: Snapshot | None) -> MicroVMSandbox:
        """One VM: restored from ``template`` (and made unique), or cold-booted; ready, with its baseline."""
        vm_id = secrets.token_hex(6)
        self._creating.add(vm_id)  # booting: not the pool's yet, and not a stray for its sweep (list_managed)
        try:
            return await self._boot_as(vm_id, image, template)
        finally:
            self._creating.discard(vm_id)

    async def _boot_as(self, vm_id: str, image: VMImage, template: Snapshot | None) -> MicroVMSandbox:
        directory = self._vms / vm_id
        await asyncio.to_thread(directory.mkdir, 0o700)
        record = VMRecord(vm_id, NAME_PREFIX + vm_id, VMRecord.now(), str(image.directory), _mac(), str(uuid.uuid4()))
        sandbox = MicroVMSandbox(directory, record, self._key, self._net.address)
        started = time.monotonic()
        try:
            await self._start(sandbox, image, template)
            sandbox.boot_s = time.monotonic() - started
            if self._settings.lure.enabled:  # hot-plugged after boot or restore: never part of a saved VM state
                await self._attach_lure(sandbox)
            if template is None:
                await sandbox.take_baseline()
            else:
                sandbox.restored_from = str(template.directory)
                await make_unique(sandbox, new_identity(record.machine_uuid, record.mac))
                roots = self._fresh_roots()
                listing = ["find", *roots, "-xdev", "-printf", r"%p\0%y %s %m %T@ %C@\0"]
                fresh = await run(sandbox, listing, max_output=256 << 20, timeout_s=LISTING_TIMEOUT_S)
                if fresh.status.code not in (0, 1):
                    raise SandboxError(f"listing {sandbox.name}'s files failed: {fresh.stderr[-500:]!r}")
                kept = await asyncio.to_thread(template.baseline.read_bytes)
                baseline = snapshot.merge_baseline(kept, fresh.stdout, tuple(r.encode() for r in roots))
                await asyncio.to_thread((directory / BASELINE).write_bytes, baseline)
            sandbox.baseline_s = time.monotonic() - started - sandbox.boot_s
            how = f"restored from {template.directory.name}" if template else f"cold boot ({self._accel.name})"
            log.info(
                "VM %s: agent and sshd ready %.1fs after QEMU's start, %s; %s in %.1fs", record.name, sandbox.boot_s, how,
                "baseline" if template is None else "made unique, baseline", sandbox.baseline_s,
            )  # fmt: skip
        except BaseException as exc:
            await asyncio.shield(sandbox.remove())
            if isinstance(exc, CgroupError):
                raise SandboxUnavailable(f"{record.name}: {exc}") from exc
            raise
        return sandbox

    def _fresh_roots(self) -> tuple[str, ...]:
        """What a restored VM's baseline walks again: what restoring and making it unique change, and the lure's
        mount point with its parent (made after the template was saved)."""
        if not self._settings.lure.enabled:
            return FRESH_ROOTS
        return (*FRESH_ROOTS, posixpath.dirname(self._settings.lure.path.rstrip("/")) or "/")

    async def _attach_lure(self, sandbox: MicroVMSandbox) -> None:
        """The lure share: its daemon and virtiofsd, the device hot-plugged, the guest's mount."""
        settings = self._settings.lure
        t0 = time.monotonic()
        sandbox.lure = await virtiofs.start(settings, sandbox.directory, sandbox.record.pid, sandbox.name)
        tag = virtiofs.tag_for(settings.path)
        await asyncio.to_thread(
            virtiofs.hotplug, sandbox.directory / "qmp.sock", sandbox.directory / virtiofs.SOCKET, tag
        )
        script = virtiofs.guest_mount_script(settings.path, tag)
        result = await run(sandbox, ["sh", "-c", script], timeout_s=virtiofs.GUEST_MOUNT_TIMEOUT_S + 30)
        if not result.ok:
            raise SandboxError(f"{sandbox.name}: the guest could not mount the lure share: {result.stderr[-300:]!r}")
        sandbox.lure_s = time.monotonic() - t0
        log.info("VM %s: lure share mounted at %s in %.1fs", sandbox.name, settings.path, sandbox.lure_s)

    async def _start(
        self, sandbox: MicroVMSandbox, image: VMImage, template: Snapshot | None, hook: bool = True
    ) -> None:
        """Overlay, QEMU (with ``-incoming`` from the template's state), console, until the guest's sshd answers.
        ``hook``: the capture gateway is told (not for the template, which no attacker sees)."""
        directory, record = sandbox.directory, sandbox.record
        await self._overlay(template.disk if template else image.disk, directory / "disk.qcow2")
        state_fd = None if template is None else await asyncio.to_thread(os.open, template.state, os.O_RDONLY)
        try:
            launch = qemu.Launch(
                record.name, directory, directory / "disk.qcow2", image.kernel, image.initrd, record.mac,
                record.machine_uuid, state_fd, image.release,
            )  # fmt: skip
            cgroup = await asyncio.to_thread(self._cgroups.create, record.name, self._limits)
            if cgroup is not None:
                sandbox.release_cgroup = functools.partial(self._cgroups.remove, record.name)
            proc = await qemu.spawn(self._settings, self._accel, launch, self._net, cgroup.procs if cgroup else ())
            record.pid = proc.pid
        finally:
            if state_fd is not None:
                os.close(state_fd)
        sandbox.watch = VMWatch(
            record.name, proc, launch.qmp_socket, self._settings.unresponsive_s,
            functools.partial(self._cgroups.oom_kills, record.name), sandbox.failed,
        )  # fmt: skip
        await asyncio.to_thread(state.save, directory, record)
        if hook and self._on_start is not None:
            await self._on_start(record.id, record.pid)
        connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sandbox.console = asyncio.create_task(
            copy_console(launch.serial_socket, directory / "console.log", self._settings.console_log_max, connected)
        )
        await connected
        if template is not None:
            await self._wait_restored(sandbox)
        await self._wait_ready(sandbox, directory)

    async def _wait_restored(self, sandbox: MicroVMSandbox) -> None:
        """Until QEMU has read the whole state ("inmigrate" until then) and runs the guest."""
        deadline = time.monotonic() + self._settings.boot_timeout_s
        while time.monotonic() < deadline:
            if not await sandbox.is_running():
                tail = await asyncio.to_thread(state.tail, sandbox.directory / "qemu.log")
                raise SandboxError(f"QEMU of {sandbox.name} exited while restoring: {tail}")
            with contextlib.suppress(SandboxError):
                status = await qemu.qmp(sandbox.directory / "qmp.sock", "query-status")
                now = status.get("status") if isinstance(status, dict) else None
                if now == "running":
                    return
                if now == "paused":  # the template was saved stopped, so the state says so: run it
                    await qemu.qmp(sandbox.directory / "qmp.sock", "cont")
            await asyncio.sleep(RESTORE_POLL_S)
        raise SandboxError(f"{sandbox.name}: restoring took over {self._settings.boot_timeout_s:.0f}s")

    # --- the template -------------------------------------------------------------------------------------

    def _snapshot_key(self, image: VMImage) -> str:
        if self._qemu_version is None:
            self._qemu_version = snapshot.qemu_version(self._settings.qemu)
        dirs = (Path("/DIR"), Path("/DIR/disk.qcow2"))
        shape = qemu.Launch("NAME", *dirs, image.kernel, image.initrd, "MAC", "UUID", release=image.release)
        return snapshot.snapshot_key(
            image.inputs, self._qemu_version, qemu.qemu_argv(self._settings, self._accel, shape)
        )

    async def _save_state(self, work: Path, name: str) -> int:
        """QMP migrate to ``work/state``, retried after a ``cont`` (a failed migration leaves it stopped)."""
        for attempt in range(1, SAVE_ATTEMPTS + 1):
            try:
                return await asyncio.to_thread(snapshot.save_state, work / "qmp.sock", work / "state")
            except SandboxError as exc:
                tail = await asyncio.to_thread(state.tail, work / "qemu.log", 300)
                if attempt == SAVE_ATTEMPTS:
                    raise SandboxError(f"{exc} (QEMU: {tail})") from exc
                log.warning(
                    "saving the template %s failed (attempt %d), again: %s (QEMU: %s)", name, attempt, exc, tail
                )
            await asyncio.to_thread((work / "state").unlink, True)
            await qemu.qmp(work / "qmp.sock", "cont")
            await asyncio.sleep(SETTLE_S * 2)
        raise AssertionError("unreachable")

    async def _template(self, image: VMImage) -> Snapshot | None:
        """This image's and command line's template: found, or made now (once; stale ones pruned); None if that failed."""
        key = await asyncio.to_thread(self._snapshot_key, image)
        home = self._templates
        if (found := await asyncio.to_thread(snapshot.find_snapshot, home, key)) is not None:
            return found
        if key in self._failed_templates:
            return None
        await asyncio.to_thread(home.mkdir, 0o700, True, True)
        async with self._template_lock, snapshot.locked(home / ".lock"):
            if (found := await asyncio.to_thread(snapshot.find_snapshot, home, key)) is not None:
                return found
            try:
                made = await self._save_template(image, key)
                await asyncio.to_thread(
                    prune.after_new_template, made.directory, image.directory, self._vms, self._cache_dir
                )
                return made
            except (SandboxError, OSError) as exc:
                log.warning("saving the template VM failed, every VM cold-boots in this run: %s", exc)
                self._failed_templates.add(key)
                return None

    async def _save_template(self, image: VMImage, key: str) -> Snapshot:
        """Cold-boot the template, take its listing, save it stopped, and publish the directory by a rename."""
        home = self._templates
        final = snapshot.snapshot_dir(home, key)
        await _clear_orphan_templates(home)  # we hold the lock: any such QEMU is a crash's
        token = secrets.token_hex(6)
        work = home / f"{WORK_PREFIX}{token}"  # short: QEMU's unix sockets are in it (108 bytes at most)
        await asyncio.to_thread(work.mkdir, 0o700)
        record = VMRecord(
            token, TEMPLATE_PREFIX + token, VMRecord.now(), str(image.directory), _mac(), str(uuid.uuid4())
        )
        template = MicroVMSandbox(work, record, self._key, self._net.address)
        log.info("making the template VM %s for %s (a cold boot, then a save)", record.name, final.name)
        started = time.monotonic()
        try:
            await self._start(template, image, None, hook=False)
            boot_s = time.monotonic() - started
            listing = await run(template, LISTING, max_output=256 << 20, timeout_s=LISTING_TIMEOUT_S)
            if listing.status.code not in (0, 1):
                raise SandboxError(f"the template's listing failed: {listing.stderr[-500:]!r}")
            await asyncio.to_thread((work / "baseline").write_bytes, listing.stdout)
            await run(template, ["sync"], timeout_s=60)
            await template.detach()  # no command of ours in flight in the saved guest
            t_save = time.monotonic()
            size = await self._save_state(work, record.name)
            save_s = time.monotonic() - t_save
            if template.watch is not None:
                await template.watch.close()
            with contextlib.suppress(SandboxError):
                await qemu.qmp(work / "qmp.sock", "quit")
            await qemu.kill(record.pid, record.name)
            await _release_cgroup(template)
            for leftover in ("qmp.sock", "serial.sock", qemu.AGENT_SOCKET, "vm.json"):
                (work / leftover).unlink(missing_ok=True)
            (work / "disk.qcow2").chmod(0o400)  # every restored VM's backing file: never written again
            snapshot.write_manifest(
                work, key, {"boot_s": round(boot_s, 2), "save_s": round(save_s, 2), "state_bytes": size,
                            "saved": VMRecord.now(), "template": record.name},
            )  # fmt: skip
            await asyncio.to_thread(work.rename, final)
        except BaseException:
            if template.watch is not None:
                await asyncio.shield(template.watch.close())
            await asyncio.shield(qemu.kill(record.pid, record.name))
            await asyncio.shield(_release_cgroup(template))
            await asyncio.to_thread(shutil.rmtree, work, True)
            raise
        log.info("template %s saved: boot %.1fs, save %.1fs, state %d MiB", final.name, boot_s, save_s, size >> 20)
        return Snapshot(final, key)

    async def _overlay(self, backing: Path, disk: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(backing), str(disk),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise SandboxError(f"qemu-img create {disk.name} failed: {out.decode(errors='replace')[-500:]}")

    async def _wait_ready(self, sandbox: MicroVMSandbox, directory: Path) -> None:
        """Until the guest agent answers and sshd is up (QEMU must stay up), within sandbox.microvm.boot_timeout_s."""
        deadline = time.monotonic() + self._settings.boot_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not await sandbox.is_running():
                tail = await asyncio.to_thread(state.tail, directory / "qemu.log")
                raise SandboxError(f"QEMU of {sandbox.name} exited while booting: {tail}")
            if panic := await asyncio.to_thread(state.panic_line, directory / "console.log"):
                raise SandboxError(f"{sandbox.name}: the guest kernel panicked while booting: {panic}")
            try:
                await sandbox.ready()
                return
            except (SandboxError, TimeoutError) as exc:
                last = exc
            await asyncio.sleep(READY_POLL_S)
        raise SandboxError(
            f"{sandbox.name}: the guest's agent and sshd were not ready within {self._settings.boot_timeout_s:.0f}s "
            f"(sandbox.microvm.boot_timeout_s; last: {last}; see {directory / 'console.log'})"
        )

    def sandbox(self, sandbox_id: str, name: str) -> MicroVMSandbox:
        if (live := self._live.get(sandbox_id)) is not None:
            return live
        directory = self._vms / sandbox_id
        record = state.load(directory) or VMRecord(sandbox_id, name, VMRecord.now(), "", "", "", state="preserved")
        return MicroVMSandbox(directory, record, self._key, self._net.address)

    async def list_managed(self) -> list[SandboxInfo]:
        """Every VM of this sensor (its state directories), and QEMUs of ours no directory accounts for
        (killed: a crash between start and saving the record)."""
        out = []
        known: set[str] = set()
        for directory in sorted(p for p in self._vms.iterdir() if p.is_dir()):
            record = state.load(directory)
            if record is None:
                continue
            known.add(record.name)
            if record.id in self._creating:  # a boot under TCG takes minutes; the pool's sweep must not stop it
                continue
            running = qemu.is_alive(record.pid, record.name)
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
        await virtiofs.reap_orphans(self._vms, self._vm_alive)
        for name, pid in (await asyncio.to_thread(qemu.find_qemus, NAME_PREFIX)).items():
            if name not in known and _is_ours(pid, self._vms):
                log.warning("killing QEMU %d (%s): no state directory of this sensor accounts for it", pid, name)
                await qemu.kill(pid, name)
        # This sensor's VMs that no longer run keep no cgroup (a crash between QEMU's end and stop); the kernel
        # refuses to remove one that still holds a process.
        stopped = {info.name for info in out if info.state == "preserved"}
        swept = await asyncio.to_thread(self._cgroups.sweep, stopped)
        if swept:
            log.info("removed the cgroups of %d VMs that no longer run", swept)
        return out

    def _vm_alive(self, directory: Path) -> bool:
        record = state.load(directory)
        return record is not None and qemu.is_alive(record.pid, record.name)

    async def close(self) -> None:
        """Close our connections and console copies; the VMs themselves run on (the pool stops what it owns)."""
        for sandbox in list(self._live.values()):
            await sandbox.detach()
            sandbox.close_lure()  # a honeypot that comes back cannot reach this socket pair again
        self._live.clear()


def _is_ours(pid: int, vms: Path, stem: str = "") -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return (str(vms) + "/" + stem).encode() in f.read()
    except OSError:
        return False


async def _clear_orphan_templates(home: Path) -> None:
    """A template left half-made by a killed honeypot: its QEMU (found by the work directory in its command
    line) is killed and the directory removed."""
    for name, pid in (await asyncio.to_thread(qemu.find_qemus, TEMPLATE_PREFIX)).items():
        if _is_ours(pid, home, WORK_PREFIX):
            log.warning("killing QEMU %d (%s): a template VM left by a run that ended while saving it", pid, name)
            await qemu.kill(pid, name)
    for work in await asyncio.to_thread(lambda: list(home.glob(f"{WORK_PREFIX}*"))):
        await asyncio.to_thread(shutil.rmtree, work, True)


async def _release_cgroup(vm: MicroVMSandbox) -> None:
    """The cgroup of a VM whose QEMU is gone (it may be a zombie a moment longer: the kernel says EBUSY)."""
    for _ in range(50):
        if vm.release_cgroup is None or await asyncio.to_thread(vm.release_cgroup):
            vm.release_cgroup = None
            return
        await asyncio.sleep(0.1)
