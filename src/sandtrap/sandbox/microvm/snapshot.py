"""A booted VM saved once, restored for every later VM: the template's files, their cache key and the QMP save.

The first create for an image and a QEMU command line cold-boots a *template* VM (never handed out, named
``sandtrap-vmtpl-*``, so it is never a box of ``list_managed``), waits for its sshd, takes the file listing,
closes the honeypot's connection and saves the stopped machine with QMP ``migrate`` to an fd handed over on the
QMP socket (``getfd``: QEMU runs with ``-sandbox on,spawn=deny``, so no ``exec:`` migration, and as
``-runas`` it could not open a file of ours). Everything lands in the sensor's
``<data_dir>/microvm/templates/snapshot-<key16>/`` (0700: it holds a guest's RAM):

- ``state``: the migration stream (RAM and device state), read by each restored QEMU as ``-incoming fd:N``;
- ``disk.qcow2``: the template's overlay, read-only from then on: the backing file of each restored VM's own
  overlay, so the guest's page cache in ``state`` and its disk agree;
- ``baseline``: the template's file listing; ``manifest.json``: the key and the figures.

The disk is opened with ``auto-read-only=off`` (qemu.py): otherwise QEMU reopens the file by path when saving
inactivates it and when a restore activates it, and QEMU after ``-runas`` may not open a file in a 0700
directory of root's ("bdrv_inactivate_all() failed (-1)", "Could not open ...: Permission denied"). A VM saved
stopped is restored paused: ``cont`` runs it.

The key hashes the image's inputs, QEMU's version and the command line's shape (memory, vCPUs, devices, the
accelerator): any change makes a new template. A lock file serialises two creates (or two honeypot processes
of one sensor) that would build the same one; the directory appears by a rename, complete or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sandtrap.errors import SandboxError
from sandtrap.sandbox.microvm import prune

PREFIX = "snapshot-"
MANIFEST = "manifest.json"
FORMAT = 1  # bump when what is saved (or how a restored VM is made unique) changes
SAVE_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.5
MAX_BANDWIDTH = 100 << 30  # bytes/s: the VM is stopped, nothing to throttle for


@dataclass(frozen=True)
class Snapshot:
    directory: Path
    key: str

    @property
    def state(self) -> Path:
        return self.directory / "state"

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def baseline(self) -> Path:
        return self.directory / "baseline"


def qemu_version(qemu: str) -> str:
    try:
        out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.stdout.splitlines()[0] if out.stdout else "unknown"


def snapshot_key(image_inputs: str, qemu_version_line: str, argv: list[str]) -> str:
    """The template's key: the image, QEMU's version and its command line (VM-specific paths and ids already
    replaced by placeholders by the caller)."""
    h = hashlib.sha256()
    for part in (str(FORMAT), image_inputs, qemu_version_line, *argv):
        h.update(part.encode() + b"\0")
    return h.hexdigest()


def snapshot_dir(image_dir: Path, key: str) -> Path:
    return image_dir / f"{PREFIX}{key[:16]}"


def find_snapshot(image_dir: Path, key: str) -> Snapshot | None:
    directory = snapshot_dir(image_dir, key)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    found = Snapshot(directory, key)
    if manifest.get("key") != key or not all(p.is_file() for p in (found.state, found.disk, found.baseline)):
        return None
    prune.mark_used(directory)  # kept while in use (prune.py): by this process or another config's
    return found


def write_manifest(directory: Path, key: str, figures: dict[str, Any]) -> None:
    (directory / MANIFEST).write_text(json.dumps({"key": key, "format": FORMAT, **figures}, indent=1) + "\n")


def read_manifest(snapshot: Snapshot) -> dict[str, Any]:
    try:
        data = json.loads((snapshot.directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


@contextlib.asynccontextmanager
async def locked(path: Path) -> Any:
    """An exclusive ``flock`` on ``path`` (other processes sharing the cache wait too), polled so that a
    cancelled create stops waiting."""
    fd = await asyncio.to_thread(os.open, path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                await asyncio.sleep(LOCK_POLL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


# --- the baseline of a restored VM -------------------------------------------------------------------------


def _entries(listing: bytes) -> Iterator[tuple[bytes, bytes]]:
    parts = listing.split(b"\0")
    for i in range(0, len(parts) - 1, 2):
        yield parts[i], parts[i + 1]


def _under(path: bytes, roots: tuple[bytes, ...]) -> bool:
    return any(path == root or path.startswith(root + b"/") for root in roots)


def merge_baseline(template: bytes, fresh: bytes, fresh_roots: tuple[bytes, ...]) -> bytes:
    """A restored VM's baseline: ``fresh``, a listing of the trees ``fresh_roots`` (what restoring, making it
    unique and the honeypot's own login change before it is handed out), and the template's listing of
    everything else (not walked again: a full walk takes tens of seconds under TCG)."""
    out = bytearray()
    for path, meta in _entries(template):
        if not _under(path, fresh_roots):
            out += path + b"\0" + meta + b"\0"
    for path, meta in _entries(fresh):
        if _under(path, fresh_roots):
            out += path + b"\0" + meta + b"\0"
    return bytes(out)


# --- QMP: save a running VM to a file --------------------------------------------------------------------


class _QMP:
    """A blocking QMP session (run in a thread): ``getfd`` needs the fd as SCM_RIGHTS on the same
    connection as the ``migrate`` that names it, which asyncio's streams cannot send."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout_s)
        self._sock.connect(str(path))
        self._file = self._sock.makefile("rb")
        self._read(greeting=True)
        self.call("qmp_capabilities")

    def close(self) -> None:
        self._file.close()
        self._sock.close()

    def _read(self, greeting: bool = False) -> Any:
        while True:
            line = self._file.readline(1 << 20)
            if not line:
                raise SandboxError("QMP closed the connection")
            msg = json.loads(line)
            if greeting and "QMP" in msg:
                return msg["QMP"]
            if "return" in msg:
                return msg["return"]
            if "error" in msg:
                err = msg["error"]
                raise SandboxError(f"QMP: {err.get('class')}: {err.get('desc')}")

    def call(self, command: str, arguments: dict[str, Any] | None = None, fds: tuple[int, ...] = ()) -> Any:
        msg: dict[str, Any] = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        data = json.dumps(msg).encode() + b"\n"
        if fds:
            socket.send_fds(self._sock, [data], list(fds))
        else:
            self._sock.sendall(data)
        return self._read()


def save_state(qmp_path: Path, out: Path, timeout_s: float = SAVE_TIMEOUT_S) -> int:
    """Stop the VM and write its migration stream to ``out`` (a new file); the VM stays stopped. Blocking: run
    it in a thread. Returns the stream's size."""
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        session = _QMP(qmp_path, timeout_s)
        try:
            session.call("migrate-set-parameters", {"max-bandwidth": MAX_BANDWIDTH})
            session.call("stop")
            session.call("getfd", {"fdname": "snapshot"}, fds=(fd,))
            session.call("migrate", {"uri": "fd:snapshot"})
            deadline = time.monotonic() + timeout_s
            while True:
                info = session.call("query-migrate")
                status = info.get("status") if isinstance(info, dict) else None
                if status == "completed":
                    break
                if status in ("failed", "cancelled"):
                    raise SandboxError(f"saving the VM failed: {info.get('error-desc', status)}")
                if time.monotonic() > deadline:
                    raise SandboxError(f"saving the VM took over {timeout_s:.0f}s (status {status})")
                time.sleep(0.1)
        finally:
            session.close()
    except OSError as exc:
        raise SandboxError(f"QMP on {qmp_path}: {exc!r}") from exc
    finally:
        os.close(fd)
    return out.stat().st_size
