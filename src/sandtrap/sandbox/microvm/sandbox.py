"""One VM behind the seam: the honeypot's own commands and files through the guest agent (agent.py), a streaming
exec over SSH (guest.py), the attacker's logins by the guest's own sshd (relay.py), life through QEMU and QMP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import stat
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import asyncssh

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import (
    Argv,
    ChangedFile,
    Features,
    FileData,
    Login,
    Process,
    ReadReport,
    ReadWatch,
    RunResult,
    Snapshot,
    TermSize,
    diff_snapshots,
    run,
    state_of,
)
from sandtrap.sandbox.microvm import agent, guest, lureshare, qemu, relay, state, virtiofs
from sandtrap.sandbox.microvm.state import VMRecord
from sandtrap.sandbox.microvm.watch import VMWatch

log = logging.getLogger(__name__)

BASELINE = "baseline"
STOP_SYNC_TIMEOUT_S = 10.0
WATCH_S = 1.0
CGROUP_RELEASE_TRIES = 50
LISTING_TIMEOUT_S = 300.0
# Every path on the root file system with type, size, mode, mtime and ctime; NUL-separated (any byte in a name).
LISTING = ["find", "/", "-xdev", "-printf", r"%p\0%y %s %m %T@ %C@\0"]
FILE_TIMEOUT_S = 60.0
# put_file: path, mode (octal), mtime ("" to leave it); the data on stdin. Root's, as sftp as root made it.
PUT_FILE = 'cat > "$1" && chown 0:0 -- "$1" && chmod "$2" -- "$1" && { [ -z "$3" ] || touch -d "@$3" -- "$1"; }'
# get_file: the path itself (never through a symlink): its mode in hex and size; exit 3 when there is none.
STAT_FILE = '[ -e "$1" ] || [ -L "$1" ] || exit 3; exec stat -c "%f %s" -- "$1"'


def parse_listing(data: bytes) -> dict[str, str]:
    parts = data.split(b"\0")
    return {
        parts[i].decode(errors="surrogateescape"): parts[i + 1].decode(errors="replace")
        for i in range(0, len(parts) - 1, 2)
    }


def diff_listing(before: Mapping[str, str], after: Mapping[str, str]) -> list[ChangedFile]:
    out = [ChangedFile(p, "A") for p in after if p not in before]
    out += [ChangedFile(p, "D") for p in before if p not in after]
    out += [ChangedFile(p, "C") for p, meta in after.items() if p in before and before[p] != meta]
    return sorted(out, key=lambda c: c.path)


class MicroVMSandbox:
    """A QEMU VM found by its state directory. Its agent and SSH connections are made on first use."""

    def __init__(self, directory: Path, record: VMRecord, key: asyncssh.SSHKey, address: str) -> None:
        self.id = record.id
        self.name = record.name
        self._dir = directory
        self._record = record
        self._key = key
        self._address = address
        self._conn: asyncssh.SSHClientConnection | None = None
        self.agent = agent.for_vm(directory / qemu.AGENT_SOCKET, record.name, self._is_alive)
        self._lock = asyncio.Lock()
        self._watch: asyncio.Task[None] | None = None
        self.console: asyncio.Task[None] | None = None  # set by the backend that started QEMU
        self.boot_s: float | None = None  # QEMU's start to the guest's agent and sshd ready (set by create)
        self.baseline_s: float | None = None  # the file listing taken when it was warmed
        self._logins: relay.GuestLogins | None = None  # the attackers' own connections to the guest's sshd
        self.lure: lureshare.LureShare | None = None  # the lure share's events (set by the backend that made it)
        self.lure_s: float | None = None  # the lure share's start, hot-plug and guest mount (set by create)
        self.restored_from: str = ""  # the template snapshot's directory, "" after a cold boot
        self.watch: VMWatch | None = None  # set by the backend that started QEMU (watch.py)
        self.release_cgroup: Callable[[], bool] | None = None  # set with the VM's cgroups (limits.py)

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def record(self) -> VMRecord:
        return self._record

    @property
    def features(self) -> Features:
        return Features(own_sshd=True, runs_aside=True)

    def _is_alive(self) -> bool:
        return qemu.is_alive(self._record.pid, self.name)

    @property
    def failure(self) -> str:
        """Why the VM died under its session (a panic, a kill, out of memory, no answer); empty while it is well.
        The bridge ends the session with it as the reason."""
        return self.watch.failure if self.watch is not None else ""

    async def failed(self, reason: str) -> None:
        """The watch's handler: drop the connections to the guest (its channels end now, not at a keepalive's
        timeout) and kill what is left of QEMU (a panicked or stopped VM)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()
        self.agent.close()
        await qemu.kill(self._record.pid, self.name, grace_s=0)

    async def connection(self) -> asyncssh.SSHClientConnection:
        async with self._lock:
            if self._conn is not None and self._conn.is_closed():
                self._conn = None
            if self._conn is None:
                if self.failure:
                    raise SandboxError(f"VM {self.name} failed: {self.failure}")
                if not self._is_alive():
                    raise SandboxError(f"VM {self.name} is not running")
                self._conn = await guest.connect(self._record.pid, self._is_alive, self._address, self._key, self.name)
                self._watch = asyncio.create_task(self._close_when_gone(self._conn))
            return self._conn

    async def _close_when_gone(self, conn: asyncssh.SSHClientConnection) -> None:
        """A QEMU that ends (stopped by another backend object, killed, crashed) takes its tap and namespace
        with it and no TCP reset ever comes: close our connection, so every process on it ends at once."""
        while not conn.is_closed():
            if not self._is_alive():
                conn.close()
                return
            await asyncio.sleep(WATCH_S)

    async def exec(
        self,
        argv: Argv,
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: Login | None = None,
    ) -> Process:
        if login is not None and login.kind:  # the guest's own sshd serves it (relay.py); argv is ours, unused
            return await self._relay().open(login, tty)
        conn = await self.connection()
        return await guest.start(conn, argv, tty=tty, env=env, user=user, workdir=workdir)

    def _relay(self) -> relay.GuestLogins:
        if self._logins is None:
            self._logins = relay.GuestLogins(
                self._record.pid, self._is_alive, self._address, self._key, self.name, self._authorize
            )
        return self._logins

    async def _authorize(self, username: str) -> None:
        """The access key in ``username``'s authorized_keys (a publickey login relayed: relay.py)."""
        line = self._key.export_public_key("openssh").decode().strip()
        result = await run(self, ["sh", "-c", relay.AUTHORIZE, "sh", username, line], timeout_s=30)
        if not result.ok:
            raise SandboxError(f"cannot authorize the access key for {username!r} in {self.name}: {result.stderr!r}")

    async def end_login(self, session: str) -> None:
        if self._logins is not None:
            await self._logins.end(session)

    async def network_address(self) -> str:
        return self._address

    async def run_aside(
        self, argv: Argv, stdin: bytes, *, user: str, max_output: int, timeout_s: float | None
    ) -> RunResult:
        """:func:`~sandtrap.sandbox.base.run` by the guest agent: no login of ours shows in the guest."""
        if self.failure:
            raise SandboxError(f"VM {self.name} failed: {self.failure}")
        return await self.agent.run(argv, stdin, user=user, max_output=max_output, timeout_s=timeout_s)

    async def ready(self) -> None:
        """The guest agent answers and the guest's sshd is up (systemd says ``active``: Debian's unit is of type
        notify, so it listens); SandboxError until then."""
        result = await self.agent.run(["systemctl", "is-active", "ssh.service"], timeout_s=agent.CALL_TIMEOUT_S)
        if result.stdout.strip() != b"active":
            raise SandboxError(f"{self.name}'s sshd is {result.stdout.strip().decode(errors='replace') or 'not up'}")

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        argv = ["sh", "-c", PUT_FILE, "sh", path, f"{stat.S_IMODE(mode):o}", "" if mtime is None else f"{mtime:.6f}"]
        result = await run(self, argv, data, timeout_s=FILE_TIMEOUT_S)
        if not result.ok:
            raise SandboxError(f"put {path} into {self.name}: {result.stderr[-300:]!r}")

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        seen = await run(self, ["sh", "-c", STAT_FILE, "sh", path], timeout_s=FILE_TIMEOUT_S)
        if seen.status.code == 3:
            return None
        fields = seen.stdout.split()
        if not seen.ok or len(fields) != 2:
            raise SandboxError(f"stat {path} in {self.name}: {seen.stderr[-300:]!r}")
        mode, size = int(fields[0], 16), int(fields[1])
        regular = stat.S_ISREG(mode)
        data: bytes | None = None
        if regular and size <= max_bytes:
            data = await self.agent.read_file(path, max_bytes, timeout_s=FILE_TIMEOUT_S)
            if len(data) > max_bytes:  # grew since the stat
                data = None
        return FileData(path, size, stat.S_IMODE(mode), regular, data)

    async def listing(self) -> dict[str, str]:
        result = await run(self, LISTING, max_output=256 << 20, timeout_s=LISTING_TIMEOUT_S)
        if result.status.code not in (0, 1):  # 1: a file vanished while find walked
            raise SandboxError(f"listing {self.name}'s files failed: {result.stderr[-500:]!r}")
        return parse_listing(result.stdout)

    async def take_baseline(self) -> None:
        data = await run(self, LISTING, max_output=256 << 20, timeout_s=LISTING_TIMEOUT_S)
        await asyncio.to_thread((self._dir / BASELINE).write_bytes, data.stdout)

    async def snapshot(self) -> Snapshot:
        """The whole listing (a VM's disk has no diff to ask)."""
        return Snapshot({path: state_of("A", meta) for path, meta in (await self.listing()).items()})

    async def changed_files(self, since: Snapshot | None = None) -> list[ChangedFile]:
        """Since ``since``, else since the listing taken when it was warmed."""
        if since is not None:
            return diff_snapshots(since, await self.snapshot())
        try:
            raw = await asyncio.to_thread((self._dir / BASELINE).read_bytes)
        except OSError as exc:
            raise SandboxError(f"{self.name} has no baseline listing: {exc}") from exc
        return diff_listing(parse_listing(raw), await self.listing())

    async def watch_reads(self, paths: Sequence[str], report: ReadReport) -> ReadWatch | None:
        """Through the lure file system (inotify on a host path cannot see inside a VM): ``paths`` outside it
        are served from it from now on (``lureshare.plant_tokens``); every access in it is reported too."""
        share = self.lure
        if share is None:
            return None
        try:
            await lureshare.plant_tokens(share, self, paths)
        except SandboxError as exc:  # the lure's own files are still watched
            log.warning("VM %s: honeytokens not served from the lure share, their reads go unseen: %s", self.name, exc)
        share.watch(report)
        return _LureWatch(share)

    async def claim(self, session: str, src_ip: str) -> None:
        if not self._is_alive():  # the pool drops a warm VM found stopped (its QEMU killed, the host rebooted)
            raise SandboxError(f"VM {self.name} is not running: it cannot be claimed")
        self._record.session, self._record.src_ip = session, src_ip
        self._record.state, self._record.acquired = "active", VMRecord.now()
        await asyncio.to_thread(state.save, self._dir, self._record)

    async def is_running(self) -> bool:
        return self._is_alive()

    async def _close_connection(self) -> None:
        logins, self._logins = self._logins, None
        if logins is not None:
            await logins.close()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.agent.close()
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.wait_closed(), 5)

    async def detach(self) -> None:
        """Let go of the VM without stopping it: its agent and SSH connections and the console copy end."""
        await self._close_connection()
        if self.console is not None:
            self.console.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.console
            self.console = None

    def close_lure(self) -> None:
        """Our end of the lure share's events socket (the VM's daemons go with the VM)."""
        share, self.lure = self.lure, None
        if share is not None:
            share.close()

    async def stop(self) -> None:
        """Sync the guest's disk, quit QEMU (the overlay stays for forensics); harmless twice. A failed VM is
        killed at once (nothing there answers)."""
        if self.watch is not None:
            await self.watch.close()
        if self._is_alive():
            if not self.failure:
                with contextlib.suppress(SandboxError, TimeoutError, OSError):
                    await run(self, ["sync"], timeout_s=STOP_SYNC_TIMEOUT_S)
            await self._close_connection()
            if not self.failure:
                with contextlib.suppress(SandboxError):
                    await qemu.qmp(self._dir / "qmp.sock", "quit")
            await qemu.kill(self._record.pid, self.name, grace_s=0 if self.failure else 5.0)
        self.close_lure()
        await virtiofs.cleanup(self._dir)
        await self.detach()
        if self.release_cgroup is not None and not self._is_alive():
            for _ in range(CGROUP_RELEASE_TRIES):  # QEMU may be a zombie a moment longer (the kernel says EBUSY)
                if await asyncio.to_thread(self.release_cgroup):
                    self.release_cgroup = None
                    break
                await asyncio.sleep(0.1)
        if self._record.state != "preserved" and self._dir.exists():
            self._record.state, self._record.released = "preserved", VMRecord.now()
            await asyncio.to_thread(state.save, self._dir, self._record)

    async def remove(self) -> None:
        """Stop and delete the VM's state directory and overlay; harmless when gone."""
        await self.stop()
        await asyncio.to_thread(shutil.rmtree, self._dir, True)


class _LureWatch:
    def __init__(self, share: lureshare.LureShare) -> None:
        self._share = share

    def close(self) -> None:
        self._share.unwatch()


async def copy_console(sock_path: Path, log_path: Path, max_bytes: int, connected: asyncio.Future[None]) -> None:
    """Connect to QEMU's serial socket (QEMU waits for this before it runs the guest) and copy what the guest
    writes to ``log_path`` up to ``max_bytes``; the rest is read and dropped, so the guest never blocks."""
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        for _ in range(200):
            try:
                reader, writer = await asyncio.open_unix_connection(str(sock_path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                await asyncio.sleep(0.05)
        if reader is None:
            raise SandboxError(f"QEMU's serial socket {sock_path} never appeared")
        connected.set_result(None)
        fd = await asyncio.to_thread(os.open, log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        written, dropped = 0, 0
        try:
            while data := await reader.read(64 * 1024):
                keep = data[: max(0, max_bytes - written)]
                if keep:
                    written += os.write(fd, keep)
                dropped += len(data) - len(keep)
        finally:
            if dropped:
                os.write(fd, f"\n[sandtrap: {dropped} more bytes of console output dropped]\n".encode())
            os.close(fd)
    except BaseException as exc:
        if not connected.done():
            connected.set_exception(exc if isinstance(exc, Exception) else SandboxError("console copy cancelled"))
        if not isinstance(exc, OSError):  # a guest whose QEMU died: its console just ends
            raise
    finally:
        if writer is not None:
            writer.close()
