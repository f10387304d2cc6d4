"""Reading a running box's files from the host, without the engine and without trusting a byte of it.

At a session's end the honeypot collects every file the attacker changed. Through the engine's API
that is a diff, an inspect, a ``find`` exec and two calls per file: with hundreds of sessions ending
at once the engine falls behind and file changes are lost. When the honeypot runs on the engine's
host (the default deployment), the same facts are on the host's disk:

* the overlay's upper directory holds exactly what the box changed (whiteouts mark deletions);
* ``/proc/<box's pid 1>/root`` is the box's whole file tree, its tmpfs mounts included.

Every name under those directories is the attacker's. Paths are walked one component at a time
from a directory descriptor with ``O_NOFOLLOW`` (a symlink is never followed; ``..`` never appears
because paths are normalised first and each component is checked), and only regular files are
read (``O_NONBLOCK`` keeps a FIFO from blocking; the box cannot make device nodes, it has no
CAP_MKNOD). A path with a symlink on the way raises :class:`NeedEngine`: the caller asks the
engine, which resolves links inside the box's root.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Iterator

from sandtrap.sandbox.base import GONE, ChangedFile, FileData, state_of

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


class NeedEngine(Exception):
    """The host cannot answer safely (a symlink on the way, the root gone): ask the engine."""


def parts(path: str) -> list[str]:
    """The components of an absolute box path; refuses ``..`` and empty names."""
    out = [p for p in path.split("/") if p not in ("", ".")]
    if any(p == ".." for p in out):
        raise NeedEngine(f"path with '..': {path!r}")
    return out


@contextlib.contextmanager
def _open_dir(root_fd: int, names: list[str]) -> Iterator[int | None]:
    """A descriptor of the directory ``names`` below ``root_fd`` (None: it does not exist)."""
    fd = os.dup(root_fd)
    try:
        for name in names:
            try:
                nxt = os.open(name, _DIR, dir_fd=fd)
            except FileNotFoundError:
                yield None
                return
            except OSError as exc:
                if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise NeedEngine(f"not a plain directory on the way: {name!r}") from exc
                raise
            os.close(fd)
            fd = nxt
        yield fd
    finally:
        os.close(fd)


Verify = Callable[[], bool]


def _open_root(root: str, verify: Verify | None) -> int:
    """A descriptor of the box's root; ``verify`` (checked after opening) proves it is still the box's."""
    try:
        fd = os.open(root, _DIR & ~os.O_NOFOLLOW)  # /proc/<pid>/root is a link by design
    except OSError as exc:
        raise NeedEngine(f"box root not reachable: {exc}") from exc
    if verify is not None and not verify():
        os.close(fd)
        raise NeedEngine("the box's pid 1 is gone (its pid may belong to another process now)")
    return fd


def read_file(root: str, path: str, max_bytes: int, verify: Verify | None = None) -> FileData | None:
    """``path`` inside the tree at ``root``: its metadata, and its bytes if regular and within ``max_bytes``."""
    names = parts(path)
    if not names:
        raise NeedEngine("the root itself")
    root_fd = _open_root(root, verify)
    try:
        with _open_dir(root_fd, names[:-1]) as dir_fd:
            if dir_fd is None:
                return None
            try:
                st = os.stat(names[-1], dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                return None
            mode = stat.S_IMODE(st.st_mode)
            if not stat.S_ISREG(st.st_mode):
                return FileData(path=path, size=st.st_size, mode=mode, is_regular=False, data=None)
            data = None
            if max_bytes >= 0 and st.st_size <= max_bytes:
                data = _read_regular(dir_fd, names[-1], max_bytes)
            if data is None:
                return FileData(path=path, size=st.st_size, mode=mode, is_regular=True, data=None)
            return FileData(path=path, size=len(data), mode=mode, is_regular=True, data=data)
    finally:
        os.close(root_fd)


def _read_regular(dir_fd: int, name: str, max_bytes: int) -> bytes | None:
    """The bytes of a regular file (None if it changed type or grew past ``max_bytes`` meanwhile)."""
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        chunks, total = [], 0
        while chunk := os.read(fd, min(1 << 20, max_bytes + 1 - total)):
            chunks.append(chunk)
            total += len(chunk)
            if total > max_bytes:
                return None
        return b"".join(chunks)
    finally:
        os.close(fd)


def walk(top: str, limit: int = 20_000) -> Iterator[tuple[str, os.stat_result]]:
    """``(path relative to top with a leading '/', lstat)`` for every entry under ``top``."""
    try:
        top_fd = os.open(top, _DIR & ~os.O_NOFOLLOW)
    except OSError as exc:
        raise NeedEngine(f"{top} not reachable: {exc}") from exc
    seen = 0
    stack: list[tuple[int, str]] = [(top_fd, "")]
    try:
        while stack:
            fd, where = stack.pop()
            try:
                with os.scandir(fd) as it:
                    listing = [(e.name, e) for e in it]
                for name, entry in listing:
                    seen += 1
                    if seen > limit:
                        return
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue
                    path = f"{where}/{name}"
                    yield path, st
                    if stat.S_ISDIR(st.st_mode):
                        with contextlib.suppress(OSError):
                            stack.append((os.open(name, _DIR, dir_fd=fd), path))
            finally:
                os.close(fd)
    finally:
        for fd, _ in stack:
            os.close(fd)


def _exists_in(lower_fds: list[int], names: list[str]) -> bool:
    for fd in lower_fds:
        try:
            with _open_dir(fd, names[:-1]) as dir_fd:
                if dir_fd is not None:
                    os.stat(names[-1], dir_fd=dir_fd, follow_symlinks=False)
                    return True
        except (OSError, NeedEngine):
            continue
    return False


_TYPES = {stat.S_IFREG: "f", stat.S_IFDIR: "d", stat.S_IFLNK: "l", stat.S_IFCHR: "c", stat.S_IFBLK: "b"}
_TYPES |= {stat.S_IFIFO: "p", stat.S_IFSOCK: "s"}


def _ns(value: int) -> str:
    return f"{value // 10**9}.{value % 10**9:09d}0"


def meta(st: os.stat_result) -> str:
    """A file's type, size, mode, mtime and ctime, as ``find -printf '%y %s %m %T@ %C@'`` prints them."""
    kind = _TYPES.get(stat.S_IFMT(st.st_mode), "U")
    return f"{kind} {st.st_size} {stat.S_IMODE(st.st_mode):o} {_ns(st.st_mtime_ns)} {_ns(st.st_ctime_ns)}"


def upper_states(upper: str, lowers: list[str], limit: int = 20_000) -> dict[str, str]:
    """What a box changed in its image, as :class:`~sandtrap.sandbox.base.Snapshot` states: regular files added
    (A) or changed (C) with their metadata, and deletions (:data:`~sandtrap.sandbox.base.GONE`)."""
    lower_fds = []
    try:
        for lower in lowers:
            with contextlib.suppress(OSError):
                lower_fds.append(os.open(lower, _DIR & ~os.O_NOFOLLOW))
        out = {}
        for path, st in walk(upper, limit):
            if stat.S_ISCHR(st.st_mode) and st.st_rdev == 0:  # an overlay whiteout: deleted
                out[path] = GONE
            elif stat.S_ISREG(st.st_mode):
                out[path] = state_of("C" if _exists_in(lower_fds, parts(path)) else "A", meta(st))
        return out
    finally:
        for fd in lower_fds:
            os.close(fd)


def upper_changes(upper: str, lowers: list[str], limit: int = 20_000) -> list[ChangedFile]:
    """What a box changed in its image: regular files added (A) or changed (C), and deletions (D)."""
    return [
        ChangedFile(p, "D" if s == GONE else "A" if s[0] == "A" else "C")
        for p, s in upper_states(upper, lowers, limit).items()
    ]


def mount_states(
    root: str, mount: str, since: float | None, verify: Verify | None = None, limit: int = 20_000
) -> dict[str, str]:
    """Regular files under ``mount`` in the box whose status changed after ``since`` (all if None), with their
    metadata (as added: ``A``)."""
    names = parts(mount)
    root_fd = _open_root(root, verify)
    try:
        with _open_dir(root_fd, names) as fd:
            if fd is None:
                return {}
            top = f"/proc/self/fd/{fd}"
            prefix = "/" + "/".join(names)
            return {
                prefix + path: state_of("A", meta(st))
                for path, st in walk(top, limit)
                if stat.S_ISREG(st.st_mode) and (since is None or st.st_ctime > since)
            }
    finally:
        os.close(root_fd)


def new_files(
    root: str, mount: str, since: float | None, verify: Verify | None = None, limit: int = 20_000
) -> list[str]:
    """Regular files under ``mount`` in the box whose status changed after ``since`` (all if None)."""
    return list(mount_states(root, mount, since, verify, limit))
