"""One VM's lure share on the host: the lure file system daemon (``lurefs.py``), virtiofsd exporting its mount,
the vhost-user-fs device hot-plugged into QEMU over QMP, the guest's mount, and the daemon's events.

In the VM's state directory: ``lure.src/`` (the generated tree, unless ``lure.source`` names one),
``lure.mnt/`` (the FUSE mount), ``lure.json`` (the two processes' pids), ``lurefs.log``, ``virtiofsd.log``.

- The device is hot-plugged after the guest is up (vhost-user-fs cannot migrate in QEMU 7.2, so it stays out
  of any saved VM state): virtiofsd's socket is connected here and the connected fd handed to QEMU with QMP
  ``getfd`` (QEMU, unprivileged, opens no host path), then ``chardev-add`` and ``device_add``.
- virtiofsd runs root only for its namespace sandbox (pivot_root into the mount), with every file-server
  capability dropped (the share is read-only), ``cache=none`` (every guest access reaches it), few files.
- Read-only three times over: the guest mounts ``ro``, the FUSE mount is ``ro``, the daemon refuses writes.
- Both processes die with QEMU (the daemon watches a pidfd, virtiofsd ends with its vhost-user connection);
  :func:`cleanup` kills what is left and detaches the mount; :func:`reap_orphans` does it for VMs gone.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import ctypes
import errno
import json
import logging
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sandtrap.config import LureSettings
from sandtrap.errors import SandboxError, SandboxUnavailable
from sandtrap.sandbox.microvm import lure, qemu
from sandtrap.sandbox.microvm.lure import FSTYPE
from sandtrap.sandbox.microvm.lureshare import LureShare

log = logging.getLogger(__name__)

RECORD = "lure.json"
MOUNT = "lure.mnt"
SOURCE = "lure.src"
SOCKET = "virtiofs.sock"
START_TIMEOUT_S = 15.0
GUEST_MOUNT_TIMEOUT_S = 60.0
MNT_DETACH = 2
CHARDEV = "lurefs0"
DEVICE = "lurefs-dev0"
# virtiofsd keeps these by default for a writable share; a read-only one needs none of them.
DROPPED_CAPS = "-chown:-dac_override:-fowner:-fsetid:-setgid:-setuid:-mknod:-setfcap"
VIRTIOFSD_NOFILE = 4096
LUREFS = b"sandtrap.sandbox.microvm.lurefs"  # in the command lines of the two processes (with the VM's directory)
VIRTIOFSD = b"virtiofsd"
LOG_MAX = 1024 * 1024


def tag_for(path: str) -> str:
    """The mount's tag (the guest's /proc/mounts shows it as the source): the directory's name."""
    return path.rstrip("/").rsplit("/", 1)[-1][:36] or "data"


def virtiofsd_argv(settings: LureSettings, directory: Path) -> list[str]:
    options = f"source={directory / MOUNT},cache=none,sandbox=namespace,no_xattr,no_posix_lock,no_flock,"
    options += f"log_level=err,modcaps={DROPPED_CAPS}"
    # prlimit: its log file stops at LOG_MAX (past it the kernel ends virtiofsd: the guest loses only its share).
    return ["prlimit", f"--fsize={LOG_MAX}", "--core=0", "--", settings.virtiofsd, f"--socket-path={directory / SOCKET}", "-o", options,
            f"--rlimit-nofile={VIRTIOFSD_NOFILE}"]  # fmt: skip


def usable(settings: LureSettings) -> tuple[bool, str]:
    """Can this host serve lure shares? (doctor; the backend refuses to start without it when enabled)"""
    if not os.access(settings.virtiofsd, os.X_OK):
        return False, (
            f"sandbox.microvm.lure.virtiofsd: {settings.virtiofsd} is not an executable: apt-get install "
            "qemu-system-common (or set sandbox.microvm.lure.enabled: false)"
        )
    try:
        os.close(os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC))
    except OSError as exc:
        return False, f"/dev/fuse: {exc.strerror} (set sandbox.microvm.lure.enabled: false without FUSE)"
    try:
        os.environ.setdefault("FUSE_LIBRARY_NAME", "fuse3")  # as lurefs.py: libfuse 3
        import mfusepy  # noqa: F401  (loaded here, not at import: doctor reports a missing libfuse, never crashes)
    except (OSError, AttributeError) as exc:
        return False, f"libfuse 3 cannot be loaded ({exc}): apt-get install libfuse3-3"
    return True, f"virtiofsd {settings.virtiofsd} and /dev/fuse usable"


def _prepare_source(settings: LureSettings, directory: Path) -> Path:
    if settings.source:
        return Path(settings.source)
    source = directory / SOURCE
    source.mkdir(mode=0o700, exist_ok=True)
    lure.write_tree(source, lure.default_files(random.Random(secrets.randbits(64)), time.time()))
    return source


def _mounted(mountpoint: Path) -> bool:
    target = os.path.realpath(mountpoint)
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            return any(line.split()[4] == target and f" - {FSTYPE} " in line for line in f)
    except OSError:
        return False


async def start(settings: LureSettings, directory: Path, qemu_pid: int, name: str) -> LureShare:
    """The daemon and virtiofsd for one VM, the mount made and the socket ready; the pids recorded."""
    mount = directory / MOUNT
    await asyncio.to_thread(mount.mkdir, 0o700, False, True)
    source = await asyncio.to_thread(_prepare_source, settings, directory)
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    config = {
        "mount": str(mount), "source": str(source), "qemu_pid": qemu_pid, "events_fd": theirs.fileno(),
        "max_bytes": settings.max_bytes, "rate": settings.events_per_s, "burst": settings.events_burst,
    }  # fmt: skip
    share = LureShare(settings, directory, ours, name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        daemon = [sys.executable, "-m", "sandtrap.sandbox.microvm.lurefs", json.dumps(config)]
        await asyncio.to_thread(_spawn, daemon, directory / "lurefs.log", (theirs.fileno(),), env)
        theirs.close()
        await _until(lambda: _mounted(mount), directory, LUREFS, "its FUSE mount", "lurefs.log")
        await asyncio.to_thread(_spawn, virtiofsd_argv(settings, directory), directory / "virtiofsd.log", (), env)
        await _until((directory / SOCKET).exists, directory, VIRTIOFSD, "virtiofsd's socket", "virtiofsd.log")
    except BaseException:
        theirs.close()
        share.close()
        await cleanup(directory)
        raise
    pids = {"lurefs": _pids_in(directory, LUREFS), "virtiofsd": _pids_in(directory, VIRTIOFSD)}
    await asyncio.to_thread(_save_pids, directory, pids)
    return share


def _spawn(argv: list[str], logfile: Path, pass_fds: tuple[int, ...], env: dict[str, str]) -> None:
    """Start ``argv`` under ``setsid --fork``: not the honeypot's child (init reaps it, and it lives on through a
    honeypot restart, as its VM does), found again by its command line, which names the VM's directory."""
    fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        subprocess.run(
            ["setsid", "--fork", *argv], stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, pass_fds=pass_fds,
            env=env, check=True, timeout=10,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        raise SandboxError(f"cannot start {argv[0]} for the lure share: {exc}") from exc
    finally:
        os.close(fd)


async def _until(ready: Callable[[], bool], directory: Path, mark: bytes, what: str, logname: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    missed = 0  # looks in a row that found no such process: one alone can fall in an exec (setsid, prlimit),
    # while /proc/PID/cmdline reads empty (seen on a loaded host: a live virtiofsd taken for an exited one)
    while not await asyncio.to_thread(ready):
        missed = 0 if await asyncio.to_thread(_pids_in, directory, mark) else missed + 1
        gone = missed >= 3
        if gone or time.monotonic() > deadline:
            tail = await asyncio.to_thread(_tail, directory / logname)
            state = "exited" if gone else f"not within {START_TIMEOUT_S:.0f}s"
            raise SandboxError(f"the lure share's {what} did not come up ({state}): {tail}")
        await asyncio.sleep(0.05)


def _tail(path: Path) -> str:
    try:
        return path.read_bytes()[-1500:].decode(errors="replace").strip() or "(no output)"
    except OSError:
        return "(no log)"


def _save_pids(directory: Path, pids: dict[str, list[int]]) -> None:
    if directory.exists():
        (directory / RECORD).write_text(json.dumps(pids) + "\n")


# --- Hot-plug and the guest's mount -------------------------------------------------------------------


def _qmp_exchange(sock: socket.socket, reader: Any, message: dict[str, Any], fds: list[int] | None = None) -> Any:
    data = json.dumps(message).encode() + b"\n"
    if fds:
        sock.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
    else:
        sock.sendall(data)
    while True:
        line = reader.readline(1 << 20)
        if not line:
            raise EOFError("QMP closed the connection")
        reply = json.loads(line)
        if "return" in reply:
            return reply["return"]
        if "error" in reply:
            raise ValueError(f"{message['execute']}: {reply['error'].get('desc')}")


def hotplug(qmp_path: Path, vhost_socket: Path, tag: str) -> None:
    """Connect to virtiofsd, hand the connection to QEMU and add the vhost-user-fs device (blocking)."""
    vhost = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        vhost.connect(str(vhost_socket))
        qmp.settimeout(qemu.QMP_TIMEOUT_S)
        qmp.connect(str(qmp_path))
        reader = qmp.makefile("rb")
        reader.readline(1 << 20)  # the greeting
        _qmp_exchange(qmp, reader, {"execute": "qmp_capabilities"})
        _qmp_exchange(qmp, reader, {"execute": "getfd", "arguments": {"fdname": CHARDEV}}, [vhost.fileno()])
        backend = {"type": "socket", "data": {"addr": {"type": "fd", "data": {"str": CHARDEV}}, "server": False}}
        _qmp_exchange(qmp, reader, {"execute": "chardev-add", "arguments": {"id": CHARDEV, "backend": backend}})
        device = {"driver": "vhost-user-fs-pci", "id": DEVICE, "chardev": CHARDEV, "tag": tag, "bus": qemu.HOTPLUG_PORT}
        _qmp_exchange(qmp, reader, {"execute": "device_add", "arguments": device})
    except (OSError, ValueError, EOFError) as exc:
        raise SandboxError(f"hot-plugging the lure share into QEMU ({qmp_path.parent.name}): {exc!r}") from exc
    finally:
        vhost.close()
        qmp.close()


def guest_mount_script(path: str, tag: str) -> str:
    """Run in the guest by the guest agent: mount once the hot-plugged device is there."""
    mount = f"mount -t virtiofs -o ro,nosuid,nodev,noexec {tag} {path}"
    tries = int(GUEST_MOUNT_TIMEOUT_S / 0.25)
    return f"mkdir -p {path} && for i in $(seq {tries}); do {mount} 2>/dev/null && exit 0; sleep 0.25; done; {mount}"


# --- Cleanup ----------------------------------------------------------------------------------------


def _is_ours(pid: int, directory: Path) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return str(directory).encode() + b"/" in f.read()
    except OSError:
        return False


def _detach(mountpoint: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.umount2(os.fsencode(mountpoint), MNT_DETACH) != 0:
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOENT):
            raise OSError(err, f"umount {mountpoint}: {os.strerror(err)}")


async def _kill(pid: int, directory: Path) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if not _is_ours(pid, directory):
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        for _ in range(60):
            await asyncio.sleep(0.05)
            if not _is_ours(pid, directory) or _is_zombie(pid):
                return


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except OSError:
        return True


async def cleanup(directory: Path) -> None:
    """The VM's lure processes killed and its mount detached; harmless twice or when there was none."""
    try:
        pids = json.loads(await asyncio.to_thread((directory / RECORD).read_text))
    except (OSError, ValueError):
        pids = {}
    for group in pids.values() if isinstance(pids, dict) else []:
        for pid in group if isinstance(group, list) else []:
            if isinstance(pid, int) and pid > 0:
                await _kill(pid, directory)
    for pid in await asyncio.to_thread(_pids_in, directory):  # virtiofsd's child in its own pid namespace
        await _kill(pid, directory)
    mount = directory / MOUNT
    if await asyncio.to_thread(_mounted, mount):
        log.info("detaching the lure mount %s", mount)
        await asyncio.to_thread(_detach, mount)
    with contextlib.suppress(OSError):
        await asyncio.to_thread((directory / SOCKET).unlink, True)


def _lure_dirs(vms: Path) -> set[Path]:
    """VM directories under ``vms`` that a lure process or mount names."""
    dirs: set[Path] = set()
    prefix = str(vms).encode() + b"/"
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
        except OSError:
            continue
        if (LUREFS in argv or VIRTIOFSD in argv) and prefix in argv:
            rest = argv[argv.index(prefix) + len(prefix) :]
            dirs.add(vms / rest.split(b"/")[0].decode(errors="replace"))
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            point = line.split()[4]
            if f" - {FSTYPE} " in line and point.startswith(str(vms) + "/"):
                dirs.add(vms / point[len(str(vms)) + 1 :].split("/")[0])
    return dirs


async def reap_orphans(vms: Path, alive: Callable[[Path], bool]) -> None:
    """Lure processes and mounts under ``vms`` whose VM is not running (a crash, a killed QEMU): gone."""
    for directory in await asyncio.to_thread(_lure_dirs, vms):
        if not alive(directory):
            log.warning("reaping the lure share of a VM that is gone: %s", directory.name)
            await cleanup(directory)


def _pids_in(directory: Path, *marks: bytes) -> list[int]:
    """The lure daemons and virtiofsd of this VM directory (never its QEMU); ``marks``: only those."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and _is_ours(int(entry), directory):
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read()
                if any(mark in argv for mark in marks or (LUREFS, VIRTIOFSD)):
                    out.append(int(entry))
    return out


def check(settings: LureSettings) -> None:
    ok, why = usable(settings)
    if not ok:
        raise SandboxUnavailable(why)
    if shutil.which("mount") is None:  # pragma: no cover - util-linux is everywhere
        raise SandboxUnavailable("mount is missing: apt-get install mount")
