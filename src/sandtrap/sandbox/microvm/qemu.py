"""QEMU for one VM: which accelerator works here, its command line, its start in a network namespace of its
own, and QMP (the machine protocol, JSON over a unix socket: docs/interop/qmp-spec in QEMU's source)."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import pwd
import shlex
import shutil
import signal
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandtrap.config import MicroVMSettings
from sandtrap.errors import SandboxError, SandboxUnavailable

log = logging.getLogger(__name__)

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_API_VERSION = 12
TAP = "tap0"
QMP_TIMEOUT_S = 10.0
HOTPLUG_PORT = "rp0"  # the root port the lure's vhost-user-fs device is hot-plugged into


@dataclass(frozen=True)
class Accel:
    name: str  # "kvm" or "tcg"
    reason: str  # why (shown by doctor and logged at start)


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def probe_kvm() -> tuple[bool, str]:
    """Can a KVM guest run here? /dev/kvm must open and create a VM, and the CPU must show vmx or svm: where it
    shows neither, /dev/kvm may still open while a guest spins in its decompressor forever (seen here)."""
    flags = _cpu_flags()
    if not flags & {"vmx", "svm"}:
        return False, "the CPU shows neither vmx nor svm (no hardware virtualisation for KVM)"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return False, f"/dev/kvm: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
        if version != KVM_API_VERSION:
            return False, f"/dev/kvm speaks KVM API {version}, not {KVM_API_VERSION}"
        vm = fcntl.ioctl(fd, KVM_CREATE_VM, 0)
        os.close(vm)
    except OSError as exc:
        return False, f"/dev/kvm cannot create a VM: {exc.strerror}"
    finally:
        os.close(fd)
    return True, "/dev/kvm creates VMs and the CPU has " + ("vmx" if "vmx" in flags else "svm")


def choose_accel(setting: str) -> Accel:
    """``sandbox.microvm.accel`` against what the probe finds; an unusable forced KVM is an error naming the key."""
    if setting == "tcg":
        return Accel("tcg", "sandbox.microvm.accel: tcg")
    usable, why = probe_kvm()
    if usable:
        return Accel("kvm", why)
    if setting == "kvm":
        raise SandboxUnavailable(
            f"sandbox.microvm.accel: kvm, but KVM is not usable here ({why}); set sandbox.microvm.accel: auto "
            "(or tcg) to emulate in software"
        )
    return Accel("tcg", f"KVM not usable ({why}): software emulation (TCG), far slower")


@dataclass(frozen=True)
class GuestNet:
    """The guest's side and the host side of its tap, in the VM's own namespace (the same in every VM's)."""

    gateway: str  # the host side of the tap, e.g. 10.20.1.1
    address: str  # the guest's eth0, e.g. 10.20.1.13
    prefix: int

    @classmethod
    def from_subnet(cls, subnet: str) -> GuestNet:
        net = ipaddress.IPv4Network(subnet)
        hosts = list(net.hosts()) if net.num_addresses <= 1 << 16 else [net[1], net[13]]
        guest = hosts[12] if len(hosts) > 12 else hosts[-1]  # .13: web-prod-03 after -01 and -02 (known_hosts)
        return cls(str(hosts[0]), str(guest), net.prefixlen)


AGENT_SOCKET = "agent.sock"  # the guest agent's virtio-serial port (agent.py), in the VM's state directory
AGENT_PORT = "org.qemu.guest_agent.0"  # the name Debian's qemu-guest-agent starts for (its udev rule)


@dataclass(frozen=True)
class Launch:
    """One VM's QEMU invocation."""

    name: str
    state_dir: Path
    disk: Path  # the VM's qcow2 overlay
    kernel: Path
    initrd: Path
    mac: str
    machine_uuid: str
    incoming_fd: int | None = None  # restore: the saved state's fd (``-incoming fd:N``), inherited by QEMU
    release: str = ""  # the kernel's `uname -r`: BOOT_IMAGE on its command line

    @property
    def qmp_socket(self) -> Path:
        return self.state_dir / "qmp.sock"

    @property
    def agent_socket(self) -> Path:
        return self.state_dir / AGENT_SOCKET

    @property
    def serial_socket(self) -> Path:
        return self.state_dir / "serial.sock"

    @property
    def chroot_dir(self) -> Path:
        """Empty and root's: QEMU's root once it runs (``sandbox.microvm.chroot``)."""
        return self.state_dir / "chroot"


def check_user(settings: MicroVMSettings) -> None:
    """``sandbox.microvm.run_as`` must exist (and not be root)."""
    if not settings.run_as:
        return
    try:
        entry = pwd.getpwnam(settings.run_as)
    except KeyError:
        raise SandboxUnavailable(
            f"sandbox.microvm.run_as: user {settings.run_as} does not exist: run scripts/setup.sh (or useradd "
            f"--system --no-create-home --shell /usr/sbin/nologin {settings.run_as}), or set run_as: '' to keep "
            "QEMU root"
        ) from None
    if entry.pw_uid == 0:
        raise SandboxUnavailable(f"sandbox.microvm.run_as: {settings.run_as} has uid 0; use an unprivileged user")


def kernel_cmdline(settings: MicroVMSettings, release: str = "") -> str:
    # no_timer_check, as cloud images boot: under TCG on a busy host the kernel's IO-APIC timer check fails and
    # it panics before any driver loads ("IO-APIC + timer doesn't work!", seen here). BOOT_IMAGE first, as GRUB
    # writes it (/proc/cmdline and PID 1's environment show it on a Debian server).
    boot = f"BOOT_IMAGE=/boot/vmlinuz-{release} " if release else ""
    base = f"{boot}root=/dev/vda ro console=ttyS0,115200 no_timer_check quiet"
    return f"{base} {settings.kernel_cmdline_extra}".strip()


def qemu_argv(settings: MicroVMSettings, accel: Accel, launch: Launch) -> list[str]:
    """QEMU's command line: fixed memory and vCPUs, no default devices, its syscalls filtered (-sandbox on)."""
    return [
        settings.qemu,
        "-name", f"{launch.name},process={launch.name}",
        "-nodefaults", "-no-user-config", "-display", "none",
        # Guest RAM in a shared memfd (vhost-user-fs needs it: virtiofsd maps it) and a PCIe root port with room
        # for the lure's device, hot-plugged after boot (virtiofs.py), so this line is the same cold or restored.
        "-object", f"memory-backend-memfd,id=mem0,size={settings.memory >> 20}M,share=on",
        "-machine", "q35,memory-backend=mem0,mem-merge=on", "-accel", "kvm" if accel.name == "kvm" else f"tcg,thread=multi,tb-size={settings.tcg_cache >> 20}",
        "-cpu", "host" if accel.name == "kvm" else "max",
        "-m", f"{settings.memory >> 20}M", "-smp", str(settings.vcpus),
        "-uuid", launch.machine_uuid,  # systemd takes the guest's machine-id from it (SMBIOS product uuid)
        # With -runas QEMU must be allowed setuid once (to drop root); as that user, with no capabilities, it can
        # never get back. Without it, set*id stays denied.
        "-sandbox", f"on,obsolete=deny,elevateprivileges={'allow' if settings.run_as else 'deny'},spawn=deny,"
        "resourcecontrol=deny",
        *(["-runas", settings.run_as] if settings.run_as else []),
        *(["-chroot", str(launch.chroot_dir)] if settings.chroot else []),
        # A guest kernel panic stops the VM (pvpanic), where the backend's watch sees it (query-status).
        "-action", "panic=pause", "-device", "pvpanic-pci",
        "-kernel", str(launch.kernel), "-initrd", str(launch.initrd), "-append", kernel_cmdline(settings, launch.release),
        # auto-read-only=off: QEMU keeps its one read-write fd. With it on, saving (inactivating the disk) and
        # restoring (activating it) reopen the file by path, which QEMU, after -runas, may not open (snapshot.py).
        "-drive", f"file={launch.disk},if=none,id=disk0,format=qcow2,discard=unmap,auto-read-only=off",
        "-device", "virtio-blk-pci,drive=disk0",
        "-netdev", f"tap,id=net0,ifname={TAP},script=no,downscript=no",
        "-device", f"virtio-net-pci,netdev=net0,mac={launch.mac}",
        "-device", "virtio-rng-pci",
        "-device", f"pcie-root-port,id={HOTPLUG_PORT},bus=pcie.0,chassis=1",
        # The guest hands its free memory back (QEMU drops those pages): an idle VM holds what its guest uses.
        "-device", "virtio-balloon-pci,free-page-reporting=on",
        # The honeypot's own channel into the guest: its guest agent (agent.py), no login in the guest's logs.
        "-device", "virtio-serial-pci,id=vser0",
        "-chardev", f"socket,id=agent0,path={launch.agent_socket},server=on,wait=off",
        "-device", f"virtserialport,bus=vser0.0,chardev=agent0,name={AGENT_PORT}",
        "-chardev", f"socket,id=con0,path={launch.serial_socket},server=on,wait=on",
        "-serial", "chardev:con0",
        "-qmp", f"unix:{launch.qmp_socket},server=on,wait=off",
        *(["-incoming", f"fd:{launch.incoming_fd}"] if launch.incoming_fd is not None else []),
    ]  # fmt: skip


def namespace_script(net: GuestNet, cgroup_procs: Sequence[Path] = ()) -> str:
    """Run by ``unshare --net`` before QEMU: into the VM's cgroups (``cgroup_procs``: before QEMU allocates
    anything), the tap and its host side in the VM's new network namespace, and nothing else (no other interface,
    no route but the tap's own subnet, forwarding off)."""
    return "; ".join(
        [
            "set -e",
            *(f"echo $$ > {shlex.quote(str(p))}" for p in cgroup_procs),
            "ip link set lo up",
            f"ip tuntap add dev {TAP} mode tap",
            f"ip addr add {net.gateway}/{net.prefix} dev {TAP}",
            f"ip link set {TAP} up",
            "echo 0 > /proc/sys/net/ipv4/ip_forward",
            'exec "$@"',
        ]
    )


async def start(settings: MicroVMSettings, accel: Accel, launch: Launch, net: GuestNet) -> int:
    """Start QEMU in a new network namespace (which lives exactly as long as QEMU); return its pid. QEMU is
    not our session's: a honeypot that restarts finds it again (list_managed)."""
    return (await spawn(settings, accel, launch, net)).pid


async def spawn(
    settings: MicroVMSettings, accel: Accel, launch: Launch, net: GuestNet, cgroup_procs: Sequence[Path] = ()
) -> asyncio.subprocess.Process:
    """:func:`start`, in the cgroups whose ``cgroup.procs`` are given; the process, whose ``wait()`` tells how QEMU
    ended (a signal: negative)."""
    for tool, package in (("unshare", "util-linux"), ("ip", "iproute2")):
        if not _which(tool):
            raise SandboxUnavailable(f"{tool} is missing: apt-get install {package}")
    argv = [
        "unshare",
        "--net",
        "--",
        "/bin/sh",
        "-c",
        namespace_script(net, cgroup_procs),
        "sandtrap-vm",
        *qemu_argv(settings, accel, launch),
    ]
    log.debug("starting %s", shlex.join(argv))
    if settings.chroot:
        await asyncio.to_thread(_empty_dir, launch.chroot_dir)
    logfile = await asyncio.to_thread(open, launch.state_dir / "qemu.log", "ab")
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=subprocess.DEVNULL, stdout=logfile, stderr=logfile, start_new_session=True,
            pass_fds=() if launch.incoming_fd is None else (launch.incoming_fd,),
        )  # fmt: skip
    except OSError as exc:
        raise SandboxUnavailable(f"cannot start QEMU ({argv[0]}): {exc}") from exc
    finally:
        logfile.close()
    # Reaped by asyncio's child watcher; the VM outlives this Process object.
    return proc


def _empty_dir(path: Path) -> None:
    path.mkdir(mode=0o555, exist_ok=True)
    if any(path.iterdir()):
        raise SandboxError(f"{path} (QEMU's chroot) is not empty")


def _which(tool: str) -> bool:
    return shutil.which(tool) is not None


def is_alive(pid: int, name: str) -> bool:
    """Is ``pid`` the QEMU of VM ``name`` (not a reused pid)?"""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except OSError:
        return False
    return state != b"Z" and f"{name},process={name}".encode() in argv


def find_qemus(prefix: str) -> dict[str, int]:
    """Every running QEMU whose VM name starts with ``prefix``: name -> pid (orphans after a crash included)."""
    found: dict[str, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        for i, arg in enumerate(argv[:-1]):
            if arg == b"-name" and argv[i + 1].startswith(prefix.encode()):
                found[argv[i + 1].split(b",")[0].decode(errors="replace")] = int(entry.name)
    return found


async def kill(pid: int, name: str, grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL after ``grace_s``; harmless when it is gone."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        if not is_alive(pid, name):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        for _ in range(int(wait_s / 0.05)):
            if not is_alive(pid, name):
                return
            await asyncio.sleep(0.05)
    if is_alive(pid, name):
        raise SandboxError(f"QEMU {pid} ({name}) survived SIGKILL")


# --- QMP ---------------------------------------------------------------------------------------------


async def qmp(path: Path, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """Run one QMP command (after the greeting and capabilities negotiation); its ``return`` value."""
    try:
        async with asyncio.timeout(QMP_TIMEOUT_S):
            reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 20)
            try:
                await _reply(reader, greeting=True)
                for cmd, args in (("qmp_capabilities", None), (command, arguments)):
                    msg: dict[str, Any] = {"execute": cmd}
                    if args:
                        msg["arguments"] = args
                    writer.write(json.dumps(msg).encode() + b"\n")
                    await writer.drain()
                    result = await _reply(reader)
                return result
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, ValueError, EOFError) as exc:
        raise SandboxError(f"QMP {command} on {path}: {exc!r}") from exc


async def _reply(reader: asyncio.StreamReader, greeting: bool = False) -> Any:
    while True:
        line = await reader.readline()
        if not line:
            raise EOFError("QMP closed the connection")
        msg = json.loads(line)
        if greeting and "QMP" in msg:
            return msg["QMP"]
        if "return" in msg:
            return msg["return"]
        if "error" in msg:
            err = msg["error"]
            raise ValueError(f"{err.get('class')}: {err.get('desc')}")
        # an event ({"event": ...}): not what we wait for
