"""Test doubles: an in-memory sandbox backend for pure pool logic (:class:`FakeBackend`: no processes, its
``read()`` ends at once), and one that behaves like a box (:class:`ChrootBackend`: real processes, a real
pty, real files), which passes tests/sandbox_suite.py as the Docker backend does."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import secrets
import shutil
import signal
import stat
import struct
import termios
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sandtrap.errors import SandboxError
from sandtrap.sandbox.base import (
    STDERR,
    STDOUT,
    Argv,
    ChangedFile,
    Chunk,
    ExitStatus,
    Features,
    FileData,
    Login,
    ReadReport,
    ReadWatch,
    SandboxInfo,
    SandboxState,
    Snapshot,
    TermSize,
    diff_snapshots,
    exit_status,
    state_of,
)
from sandtrap.sandbox.host.inotify import OpenWatcher
from sandtrap.sandbox.personas import Persona

_ids = itertools.count(1)


class FakeProcess:
    def __init__(self, output: bytes) -> None:
        self._output = output
        self.written = bytearray()
        self.size: TermSize | None = None

    async def read(self) -> None:
        return None

    async def write(self, data: bytes) -> None:
        self.written += data

    async def close_stdin(self) -> None:
        pass

    async def resize(self, size: TermSize) -> None:
        self.size = size

    async def wait(self) -> ExitStatus:
        return ExitStatus(0)

    async def kill(self) -> None:
        pass


class FakeSandbox:
    def __init__(self, backend: FakeBackend, name: str, labels: Mapping[str, str]) -> None:
        self.id = f"fake{next(_ids):08d}"
        self.name = name
        self.labels = dict(labels)
        self.running = True
        self.removed = False
        self.files: dict[str, bytes] = {}
        self.created_at = datetime.now(UTC)
        self.fail_stops = 0  # the next stops that fail (an overloaded engine)
        self.scopes: list[str] = []  # the cgroup units sessions were put into
        self._backend = backend

    async def exec(self, argv: list[str], **_: object) -> FakeProcess:
        if not self.running:
            raise SandboxError("not running")
        return FakeProcess(b"")

    features = Features()

    async def claim(self, session: str, src_ip: str) -> None:
        self.name = f"fake-s-{session}"

    address = ""  # the box's eth0 address ('' = none, as with sandbox.network: none)

    async def network_address(self) -> str:
        return self.address

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        self.files[path] = data

    async def watch_reads(self, paths: object, report: object) -> None:
        return None

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        data = self.files.get(path)
        if data is None:
            return None
        return FileData(path, len(data), 0o644, True, data if len(data) <= max_bytes else None)

    async def snapshot(self) -> Snapshot:
        return Snapshot({p: state_of("A", hashlib.sha256(d).hexdigest()) for p, d in self.files.items()})

    async def changed_files(self, since: Snapshot | None = None) -> list[ChangedFile]:
        return diff_snapshots(since or Snapshot({}), await self.snapshot())

    async def is_running(self) -> bool:
        return self.running

    async def stop(self) -> None:
        if self.fail_stops:
            self.fail_stops -= 1
            raise SandboxError("stop: engine did not answer within 30s")
        self.running = False

    async def remove(self) -> None:
        self.running = False
        self.removed = True
        self._backend.boxes.pop(self.id, None)


class FakeBackend:
    def __init__(self, fail_creates: int = 0) -> None:
        self.boxes: dict[str, FakeSandbox] = {}
        self.fail_creates = fail_creates
        self.created = 0

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> FakeSandbox:
        if self.fail_creates:
            self.fail_creates -= 1
            raise SandboxError("engine said no")
        self.created += 1
        name = f"fake-s-{session}" if session else f"fake-w-{next(_ids)}"
        labels = {"sandtrap.session": session, "sandtrap.src_ip": src_ip}
        if persona is not None:  # what a Docker box carries as its label and hostname
            labels |= {"sandtrap.persona": persona.name, "hostname": persona.hostname}
        box = FakeSandbox(self, name, labels)
        self.boxes[box.id] = box
        return box

    def sandbox(self, sandbox_id: str, name: str) -> FakeSandbox:
        return self.boxes[sandbox_id]

    async def list_managed(self) -> list[SandboxInfo]:
        out = []
        for b in self.boxes.values():
            is_session = "-s-" in b.name
            state = ("active" if is_session else "warm") if b.running else "preserved"
            out.append(SandboxInfo(b.id, b.name, state, b.created_at))  # type: ignore[arg-type]
        return out

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        pass


# -- A fake that behaves like a box: a directory, real processes chrooted into it ---------------------------------
#
# A box is ``<directory>/<id>/``: ``root/`` is its file system (a copy of the host's /etc, empty /root, /home,
# /tmp, /var, /run; the host's /usr bound read-only, with /dev and /proc), ``state.json`` what a restarted
# honeypot finds, ``snapshot.json`` its files at create (what ``changed_files`` compares against).
# Each process is a real host subprocess (asyncio.create_subprocess_exec) in a mount namespace of its own,
# chrooted into the box's root: what it writes lands in the box, never on the host (/usr is read-only), so
# code under test (useradd, mkdir -p /root/.aws) behaves as in a box. A TTY is a real pty (os.openpty).
# Test-only: it runs as root (mount, chroot), or rootless in a user namespace (ROOTLESS), and isolates nothing
# from a hostile process.

_CHROOT = 'r=$1; shift; mount --rbind -o ro /usr "$r/usr" && mount --rbind /dev "$r/dev" && mount --rbind /proc "$r/proc" && exec "$@"'
_CD = 'cd "$1" || exit 126; shift; exec "$@"'


def _default_hangup() -> None:
    """A box's processes start with SIGHUP at its default, as a box's init gives them; the test process may
    ignore it (run under nohup), and an ignored signal is inherited across exec (a shell cannot undo it)."""
    signal.signal(signal.SIGHUP, signal.SIG_DFL)


# Not root: the box's processes are root in a user namespace of their own (only that one uid is mapped, so
# exec(user=...) of another user and useradd's chown fail there).
ROOTLESS = os.geteuid() != 0
_BASE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MOUNTED = ("usr", "dev", "proc")  # bound from the host at each exec: not the box's own files
# Parts of the host's /etc no box process of the tests reads (certificates, desktop, services): not copied,
# which halves the copy per box.
_ETC_SKIPPED = {
    "certs", "fonts", "X11", "apt", "systemd", "init.d", "rc0.d", "rc1.d", "rc2.d", "rc3.d", "rc4.d", "rc5.d",
    "rc6.d", "rcS.d", "logrotate.d", "cron.daily", "dbus-1", "udev", "dconf", "gtk-2.0", "gtk-3.0", "perl",
    "python3", "bash_completion.d", "chromium", "chromium.d", "docker", "containerd", "postgresql",
    "postgresql-common", "apache2", "lighttpd", "ImageMagick-6", "java-17-openjdk", "maven",
}  # fmt: skip
_QUEUE_CHUNKS = 8  # output chunks held per process before its pipe fills (back-pressure)
_READ_BYTES = 64 * 1024


def _box_path(root: Path, path: str) -> Path:
    rel = os.path.normpath("/" + path).lstrip("/")
    if rel.split("/", 1)[0] in _MOUNTED:
        raise SandboxError(f"{path}: not a file of the box")
    return root / rel


def _snapshot(root: Path) -> dict[str, list[int]]:
    """Every non-directory of the box: its size, mtime, ctime and inode (a ctime cannot be set back)."""
    out: dict[str, list[int]] = {}
    for top, dirs, files in os.walk(root):
        if top == str(root):
            dirs[:] = [d for d in dirs if d not in _MOUNTED]
        for name in files:
            full = os.path.join(top, name)
            try:
                st = os.lstat(full)
            except OSError:
                continue
            out["/" + os.path.relpath(full, root)] = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
    return out


class HostProcess:
    """A subprocess of the test as a :class:`~sandtrap.sandbox.base.Process`. Output goes through a queue of
    ``_QUEUE_CHUNKS`` chunks: a slow reader fills it, then the pipe, then the process blocks writing."""

    def __init__(self, proc: asyncio.subprocess.Process, master: int | None) -> None:
        self.pid = proc.pid
        self._proc = proc
        self._master = master
        self._queue: asyncio.Queue[Chunk | None] = asyncio.Queue(_QUEUE_CHUNKS)
        self._open_streams = 0
        self._status: ExitStatus | None = None
        self._stdin_closed = False
        if master is None:
            pumps = [(proc.stdout, STDOUT), (proc.stderr, STDERR)]
            self._pumps = [asyncio.create_task(self._pump(s, n)) for s, n in pumps if s is not None]
        else:
            os.set_blocking(master, False)
            self._pumps = [asyncio.create_task(self._pump_pty(master))]
        self._open_streams = len(self._pumps)

    async def _pump(self, stream: asyncio.StreamReader, number: int) -> None:
        try:
            while data := await stream.read(_READ_BYTES):
                await self._queue.put(Chunk(number, data))
        finally:
            await self._queue.put(None)

    async def _pump_pty(self, master: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                try:
                    data = os.read(master, _READ_BYTES)
                except BlockingIOError:
                    ready = loop.create_future()
                    loop.add_reader(master, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_reader(master)
                    continue
                except OSError:  # EIO: every process holding the pty's other side has ended
                    return
                if not data:
                    return
                await self._queue.put(Chunk(STDOUT, data))
        finally:
            self._close_master()
            await self._queue.put(None)

    async def read(self) -> Chunk | None:
        while self._open_streams:
            chunk = await self._queue.get()
            if chunk is not None:
                return chunk
            self._open_streams -= 1
        return None

    async def write(self, data: bytes) -> None:
        if self._stdin_closed:
            return
        try:
            if self._master is None:
                assert self._proc.stdin is not None
                self._proc.stdin.write(data)
                await self._proc.stdin.drain()
                return
            view = memoryview(data)
            loop = asyncio.get_running_loop()
            while view:
                try:
                    view = view[os.write(self._master, view) :]
                except BlockingIOError:
                    ready = loop.create_future()
                    loop.add_writer(self._master, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(self._master)
        except (OSError, RuntimeError) as exc:
            raise SandboxError(f"write to process stdin failed: {exc}") from exc

    async def close_stdin(self) -> None:
        """EOF on stdin (without a TTY; a TTY has no end of input but its EOF character, sent by the client)."""
        if self._stdin_closed:
            return
        self._stdin_closed = True
        if self._master is None and self._proc.stdin is not None:
            self._proc.stdin.close()
            with contextlib.suppress(OSError):
                await self._proc.stdin.wait_closed()

    async def resize(self, size: TermSize) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                fcntl.ioctl(self._master, termios.TIOCSWINSZ, struct.pack("HHHH", size.rows, size.cols, 0, 0))

    async def wait(self) -> ExitStatus:
        if self._status is None:
            code = await self._proc.wait()
            self._status = exit_status(128 - code if code < 0 else code)
        return self._status

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        await self._proc.wait()
        for pump in self._pumps:
            pump.cancel()
        await asyncio.gather(*self._pumps, return_exceptions=True)
        self._close_master()
        self._stdin_closed = True
        transport = getattr(self._proc, "_transport", None)  # its pipes may hold unread output: closed now
        if transport is not None:
            transport.close()

    def _close_master(self) -> None:
        if self._master is not None:
            with contextlib.suppress(OSError):
                os.close(self._master)
            self._master = None


class ChrootSandbox:
    """One box of :class:`ChrootBackend` (a handle: a second backend object's handle on it works the same)."""

    features = Features()  # no login scopes, no connection in the box: exec(login=...) runs the login plainly

    def __init__(self, backend: ChrootBackend, box_id: str, name: str) -> None:
        self.id = box_id
        self.name = name
        self._backend = backend
        self._dir = backend.directory / box_id
        self.root = self._dir / "root"

    # -- state on disk (what a restarted honeypot finds) -------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        try:
            data: dict[str, Any] = json.loads((self._dir / "state.json").read_text())
        except (OSError, ValueError):
            return {}
        return data

    def _write_state(self, **changes: Any) -> None:
        state = self._state() | changes
        tmp = self._dir / "state.tmp"
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self._dir / "state.json")

    async def exec(
        self,
        argv: Argv,
        *,
        tty: TermSize | None = None,
        env: Mapping[str, str] | None = None,
        user: str = "root",
        workdir: str | None = None,
        login: Login | None = None,
    ) -> HostProcess:
        if not await self.is_running():
            raise SandboxError(f"box {self.name} is not running")
        if not argv:
            raise SandboxError("empty command")
        account = self._account(user)
        environment = {"PATH": _BASE_PATH, "HOME": account[2], "HOSTNAME": self.name[:63]}
        if tty is not None:
            environment["TERM"] = "xterm"
        environment |= dict(env or {})
        chroot = ["chroot"] if user == "root" else ["chroot", f"--userspec={account[0]}:{account[1]}"]
        command: list[str | bytes] = [*chroot, str(self.root), "/bin/sh", "-c", _CD, "sh", workdir or "/", *argv]
        wrapped: list[str | bytes] = ["unshare", *(["--user", "--map-root-user"] if ROOTLESS else [])]
        wrapped += ["--mount", "--propagation", "private", "--", "/bin/sh", "-c"]
        wrapped += [_CHROOT, "sh", str(self.root), *command]
        master: int | None = None
        if tty is None:
            proc = await asyncio.create_subprocess_exec(
                *wrapped,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=environment,
                start_new_session=True,
                preexec_fn=_default_hangup,
            )
        else:
            master, slave = os.openpty()
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", tty.rows, tty.cols, 0, 0))
            try:
                # setsid -c: a session of its own with the pty as its controlling terminal (^C, SIGWINCH)
                proc = await asyncio.create_subprocess_exec(
                    "setsid", "-c", *wrapped, stdin=slave, stdout=slave, stderr=slave, env=environment,
                    preexec_fn=_default_hangup,
                )  # fmt: skip
            except BaseException:
                os.close(master)
                raise
            finally:
                os.close(slave)
        process = HostProcess(proc, master)
        self._backend.processes.setdefault(self.id, []).append(process)
        self.logins.append(login)
        return process

    @property
    def logins(self) -> list[Login | None]:
        """The ``login`` of every exec, in order (what the bridge asked for)."""
        return self._backend.logins.setdefault(self.id, [])

    def _account(self, user: str) -> tuple[int, int, str]:
        if user == "root":
            return 0, 0, "/root"
        for line in (self.root / "etc" / "passwd").read_text().splitlines():
            parts = line.split(":")
            if len(parts) >= 7 and parts[0] == user:
                return int(parts[2]), int(parts[3]), parts[5]
        raise SandboxError(f"unable to find user {user}: no matching entries in passwd file")

    async def network_address(self) -> str:
        return ""

    async def put_file(self, path: str, data: bytes, mode: int = 0o644, mtime: float | None = None) -> None:
        target = _box_path(self.root, path)
        if not target.parent.is_dir():
            raise SandboxError(f"put {path}: no such directory in the box")
        tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        when = mtime if mtime is not None else time.time()
        os.utime(tmp, (when, when))
        os.replace(tmp, target)

    async def get_file(self, path: str, max_bytes: int) -> FileData | None:
        target = _box_path(self.root, path)
        try:
            st = os.lstat(target)
        except (FileNotFoundError, NotADirectoryError):
            return None
        regular = stat.S_ISREG(st.st_mode)
        data = None
        if regular and st.st_size <= max_bytes:
            with open(target, "rb") as f:
                data = f.read(max_bytes + 1)
            if len(data) > max_bytes:
                data = None
        return FileData(path, st.st_size, stat.S_IMODE(st.st_mode), regular, data)

    async def snapshot(self) -> Snapshot:
        now = await asyncio.to_thread(_snapshot, self.root)
        return Snapshot({p: state_of("A", json.dumps(meta)) for p, meta in now.items()})

    async def changed_files(self, since: Snapshot | None = None) -> list[ChangedFile]:
        """Since ``since``, else since the box was created (``snapshot.json``)."""
        if since is None:
            made = json.loads((self._dir / "snapshot.json").read_text())
            since = Snapshot({p: state_of("A", json.dumps(meta)) for p, meta in made.items()})
        return diff_snapshots(since, await self.snapshot())

    async def watch_reads(self, paths: Sequence[str], report: ReadReport) -> ReadWatch | None:
        """Opens seen by inotify on the box's directory, as the Docker backend watches its overlay."""
        return self._backend.reads.watch(self.root, paths, report)

    async def claim(self, session: str, src_ip: str) -> None:
        if not await self.is_running():
            raise SandboxError(f"box {self.name} is not running")
        self.name = f"{self._backend.sensor}-s-{session}-{secrets.token_hex(2)}"
        self._write_state(name=self.name, session=session, src_ip=src_ip)

    async def is_running(self) -> bool:
        return bool(self._state().get("running"))

    async def stop(self) -> None:
        if self._dir.is_dir():
            self._write_state(running=False, stopped=time.time())
        await self._kill_all()

    async def remove(self) -> None:
        await self._kill_all()
        await asyncio.to_thread(shutil.rmtree, self._dir, True)

    async def _kill_all(self) -> None:
        """Every process of the box ends: those this backend started, and any whose root is the box's (started
        by a backend object that is gone, or forked off and left behind)."""
        for process in self._backend.processes.pop(self.id, []):
            await process.kill()
        quiet = 0
        for _ in range(300):  # until three scans in a row find none (a process forking meanwhile is seen next time)
            pids = [pid for pid in _pids_rooted_at(self.root) if pid != os.getpid()]
            quiet = 0 if pids else quiet + 1
            if quiet == 3:
                return
            for pid in pids:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
            await asyncio.sleep(0.01)
        raise SandboxError(f"box {self.name}: processes still running after 3 s of SIGKILL")


def _pids_rooted_at(root: Path) -> list[int]:
    """Processes in the box: chrooted into it, or on their way there (the unshare/chroot wrapper names it)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{entry}/root") == str(root):
                    out.append(int(entry))
                    continue
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    if os.fsencode(root) in f.read().split(b"\0"):
                        out.append(int(entry))
    return out


class ChrootBackend:
    """Boxes as directories under ``directory`` for one ``sensor``. Two objects on the same directory see the same
    boxes (a restarted honeypot finds what the killed one left)."""

    def __init__(self, directory: Path, sensor: str = "fake") -> None:
        self.directory = directory
        self.sensor = sensor
        self.processes: dict[str, list[HostProcess]] = {}
        self.logins: dict[str, list[Login | None]] = {}
        self.reads = OpenWatcher()
        self.created = 0
        directory.mkdir(parents=True, exist_ok=True)

    async def create(self, session: str = "", src_ip: str = "", persona: Persona | None = None) -> ChrootSandbox:
        box_id = secrets.token_hex(16)
        name = f"{self.sensor}-s-{session}" if session else f"{self.sensor}-w-{box_id[:8]}"
        box = ChrootSandbox(self, box_id, name)
        await asyncio.to_thread(self._make, box.root)
        (box.root.parent / "snapshot.json").write_text(json.dumps(await asyncio.to_thread(_snapshot, box.root)))
        box._write_state(
            name=name, session=session, src_ip=src_ip, sensor=self.sensor, created=time.time(), running=True
        )
        self.created += 1
        return box

    @staticmethod
    def _make(root: Path) -> None:
        root.mkdir(parents=True)
        shutil.copytree("/etc", root / "etc", symlinks=True, ignore=lambda _, names: _ETC_SKIPPED & set(names))
        (root / "etc" / "hostname").write_text("box\n")
        for d in (*_MOUNTED, "root", "home", "tmp", "var/tmp", "var/log", "run", "srv", "opt"):
            (root / d).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "root", 0o700)
        os.chmod(root / "tmp", 0o1777)
        for link in ("bin", "sbin", "lib", "lib64"):
            if os.path.islink(f"/{link}"):
                os.symlink(os.readlink(f"/{link}"), root / link)

    def sandbox(self, sandbox_id: str, name: str) -> ChrootSandbox:
        return ChrootSandbox(self, sandbox_id, name)

    async def list_managed(self) -> list[SandboxInfo]:
        out = []
        for state_file in sorted(self.directory.glob("*/state.json")):
            box = ChrootSandbox(self, state_file.parent.name, "")
            state = box._state()
            if state.get("sensor") != self.sensor:
                continue
            running = bool(state.get("running"))
            session = str(state.get("session") or "")
            kind: SandboxState = ("active" if session else "warm") if running else "preserved"
            out.append(
                SandboxInfo(
                    id=box.id,
                    name=str(state.get("name")),
                    state=kind,
                    created=datetime.fromtimestamp(float(state.get("created") or 0), UTC),
                    session=session,
                    src_ip=str(state.get("src_ip") or ""),
                    released=datetime.fromtimestamp(state["stopped"], UTC) if state.get("stopped") else None,
                )
            )
        return out

    async def ping(self) -> None:
        pass

    async def close(self) -> None:
        for processes in list(self.processes.values()):
            for process in processes:
                await process.kill()
        self.processes.clear()
        self.reads.close()
