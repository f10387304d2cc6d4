"""``sandbox.backend: microvm``: a QEMU VM per box, each in a network namespace of its own.

A VM is: a qcow2 overlay on the image's base disk, a QEMU started by ``unshare --net`` after a tap is made in
that new namespace (the namespace lives exactly as long as QEMU), and a state directory (``state.py``) that a
restarted honeypot finds it by. The honeypot reaches the guest's sshd from inside that namespace.
"""

from __future__ import annotations

import asyncio
import logging
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
from sandtrap.sandbox.base import SandboxInfo
from sandtrap.sandbox.microvm import guest, qemu, state
from sandtrap.sandbox.microvm.image import GuestFiles, VMImage, find_image, vm_inputs
from sandtrap.sandbox.microvm.sandbox import MicroVMSandbox, copy_console
from sandtrap.sandbox.microvm.state import VMRecord

log = logging.getLogger(__name__)

NAME_PREFIX = "sandtrap-vm-"
READY_POLL_S = 1.0

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
        self._key = guest.load_access_key(access_key_path(self._root))
        self._guest = guest_files(sandbox, self._key, planted)
        self._net = qemu.GuestNet.from_subnet(sandbox.network_subnet)
        self._inputs = vm_inputs(image, self._guest)
        self._cache_dir = Path(cache_dir)
        qemu.check_user(settings)
        self._accel = qemu.choose_accel(settings.accel)  # SandboxUnavailable names sandbox.microvm.accel
        if self._accel.name == "tcg":
            log.warning("micro-VMs run under TCG: %s", self._accel.reason)
        else:
            log.info("micro-VMs run under KVM: %s", self._accel.reason)
        self._live: dict[str, MicroVMSandbox] = {}
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

    async def create(self, session: str = "", src_ip: str = "") -> MicroVMSandbox:
        image = self.image()
        vm_id = secrets.token_hex(6)
        directory = self._vms / vm_id
        await asyncio.to_thread(directory.mkdir, 0o700)
        record = VMRecord(
            id=vm_id,
            name=NAME_PREFIX + vm_id,
            created=VMRecord.now(),
            image=str(image.directory),
            mac=_mac(),
            machine_uuid=str(uuid.uuid4()),
        )
        sandbox = MicroVMSandbox(directory, record, self._key, self._net.address)
        started = time.monotonic()
        try:
            await self._overlay(image, directory / "disk.qcow2")
            launch = qemu.Launch(
                record.name, directory, directory / "disk.qcow2", image.kernel, image.initrd, record.mac,
                record.machine_uuid,
            )  # fmt: skip
            record.pid = await qemu.start(self._settings, self._accel, launch, self._net)
            await asyncio.to_thread(state.save, directory, record)
            if self._on_start is not None:
                await self._on_start(vm_id, record.pid)
            connected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            sandbox.console = asyncio.create_task(
                copy_console(launch.serial_socket, directory / "console.log", self._settings.console_log_max, connected)
            )
            await connected
            await self._wait_ready(sandbox, directory)
            sandbox.boot_s = time.monotonic() - started
            await sandbox.take_baseline()
            sandbox.baseline_s = time.monotonic() - started - sandbox.boot_s
            log.info(
                "VM %s: sshd ready %.1fs after QEMU's start (%s), baseline in %.1fs", record.name, sandbox.boot_s,
                self._accel.name, sandbox.baseline_s,
            )  # fmt: skip
            if session:
                await sandbox.claim(session, src_ip)
        except BaseException:
            await asyncio.shield(sandbox.remove())
            raise
        self._live[vm_id] = sandbox
        return sandbox

    async def _overlay(self, image: VMImage, disk: Path) -> None:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(image.disk), str(disk),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await proc.communicate()
        if proc.returncode != 0:
            raise SandboxError(f"qemu-img create {disk.name} failed: {out.decode(errors='replace')[-500:]}")

    async def _wait_ready(self, sandbox: MicroVMSandbox, directory: Path) -> None:
        """Until the guest's sshd takes our key: QEMU must stay up, within sandbox.microvm.boot_timeout_s."""
        deadline = time.monotonic() + self._settings.boot_timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not await sandbox.is_running():
                tail = await asyncio.to_thread(_tail, directory / "qemu.log")
                raise SandboxError(f"QEMU of {sandbox.name} exited while booting: {tail}")
            try:
                await sandbox.connection()
                return
            except SandboxError as exc:
                last = exc
            await asyncio.sleep(READY_POLL_S)
        raise SandboxError(
            f"{sandbox.name}: the guest's sshd did not answer within {self._settings.boot_timeout_s:.0f}s "
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
        for name, pid in (await asyncio.to_thread(qemu.find_qemus, NAME_PREFIX)).items():
            if name not in known and _is_ours(pid, self._vms):
                log.warning("killing QEMU %d (%s): no state directory of this sensor accounts for it", pid, name)
                await qemu.kill(pid, name)
        return out

    async def close(self) -> None:
        """Close our connections and console copies; the VMs themselves run on (the pool stops what it owns)."""
        for sandbox in list(self._live.values()):
            await sandbox.detach()
        self._live.clear()


def _is_ours(pid: int, vms: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return str(vms).encode() + b"/" in f.read()
    except OSError:
        return False


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return path.read_bytes()[-limit:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no qemu.log)"
