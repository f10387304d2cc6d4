"""The box's root file system, built the same way for any backend: what ``box/`` holds, made ready to install.

- ``debootstrap`` a Debian root file system into ``<cache>/rootfs-<hash>.tar`` (kept; rebuilt only when
  missing): :func:`make_rootfs_tar`.
- Compile the box's own programs (a static ``/sbin/init`` with the listener linked in, and the session
  helper): :func:`compile_programs`.
- The ``rootfs/`` overlay, the setup script and those programs as one tar: :func:`overlay_tar`. Installing it
  on the root file system and running the setup script there is the backend's part (a Docker commit today;
  a VM disk or an nspawn tree can take the same tar).
- The hash of every input, :func:`image_inputs`, so an unchanged rebuild is a no-op and a backend can tell
  whether what it holds is current.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from sandtrap.config import ImageSettings
from sandtrap.errors import ImageError

log = logging.getLogger(__name__)

BOX_DIR = Path(__file__).resolve().parents[1] / "box"  # the in-box payload
ROOTFS_DIR = BOX_DIR / "rootfs"
SETUP_SCRIPT = BOX_DIR / "rootfs_setup.sh"
#: The box's programs and the C files each is linked from; every ``*.c`` and ``*.h`` in ``box/`` counts as an
#: input (:func:`c_sources`) and is what the compiler sees.
PROGRAMS: dict[str, tuple[str, ...]] = {
    "init": ("init.c", "listener.c", "inetd.c", "relay.c", "wire.c"),  # PID 1, the listeners (sshd's, inetd's)
    "session": ("session.c",),  # sshd's session work in the box (utmp, motd, login shell)
}

VARIANT = "minbase"
DEBOOTSTRAP_TIMEOUT_S = 1800.0
OVERLAY_AGE_S = 150 * 86400  # overlay files look this old unless the setup script says otherwise

Detail = Callable[[str], None]


# --- inputs ------------------------------------------------------------------------------------


def packages(image: ImageSettings) -> list[str]:
    return sorted(set(image.packages) | set(image.extra_packages))


def rootfs_digest(image: ImageSettings) -> str:
    """Hash of what debootstrap is asked for; names the cached tarball and the base image."""
    spec = {"suite": image.suite, "mirror": image.mirror, "variant": VARIANT, "packages": packages(image)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def c_sources() -> list[Path]:
    """Every C source and header of the box's programs (``box/*.c``, ``box/*.h``), sorted by name."""
    return sorted((p for p in BOX_DIR.iterdir() if p.suffix in (".c", ".h") and p.is_file()), key=lambda p: p.name)


def overlay_files() -> list[Path]:
    return sorted(
        p for p in ROOTFS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _mode(path: Path) -> int:
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


def image_inputs(image: ImageSettings, base: str | None = None) -> str:
    """Hex digest of everything the image is made from.

    ``base`` is the id of a base the backend builds on instead (``docker.image.build_image`` resolves a
    reference to its id); without it, the debootstrap inputs count instead.
    """
    h = hashlib.sha256()

    def feed(name: str, data: bytes) -> None:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)

    feed("base", f"image {base}".encode() if base else f"debootstrap {rootfs_digest(image)}".encode())
    for path in overlay_files():
        feed(f"rootfs/{path.relative_to(ROOTFS_DIR).as_posix()} {_mode(path):o}", path.read_bytes())
    feed("setup", SETUP_SCRIPT.read_bytes())
    feed("programs", json.dumps(PROGRAMS, sort_keys=True).encode())
    for path in c_sources():
        feed(f"box/{path.name}", path.read_bytes())
    return h.hexdigest()


# --- progress ----------------------------------------------------------------------------------


class Steps:
    """One progress line per step: spinner, name, elapsed time, latest detail (e.g. debootstrap's I: line)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description}"),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}", markup=False, style="dim"),
            console=console,
        )
        self._task: TaskID | None = None

    def __enter__(self) -> Steps:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        t0 = time.monotonic()
        log.info("image build: %s", name)
        self._task = task = self._progress.add_task(name, total=1, detail="")
        try:
            yield
        except BaseException:
            self._progress.update(task, description=f"[red]✗ {name}[/]")
            self._progress.stop_task(task)
            raise
        self._progress.update(task, completed=1, detail="")
        log.info("image build: %s done in %.1fs", name, time.monotonic() - t0)

    def detail(self, text: str) -> None:
        if self._task is not None:
            self._progress.update(self._task, detail=text if len(text) <= 72 else text[:71] + "…")


# --- on the host: the programs and the Debian root file system ---------------------------------


async def run(
    argv: list[str], on_line: Detail | None = None, env: dict[str, str] | None = None
) -> tuple[int, list[str]]:
    """Run ``argv``, streaming its merged output line by line; return exit code and the last lines."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        limit=1 << 20,
    )
    tail: deque[str] = deque(maxlen=20)
    try:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            tail.append(line)
            log.debug("%s: %s", argv[0], line)
            if on_line is not None:
                on_line(line)
        return await proc.wait(), list(tail)
    finally:
        if proc.returncode is None:  # cancelled or failed while reading: take its children down too
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()


async def compile_programs(tmp: Path, steps: Steps) -> Path:
    """Compile the box's own programs (:data:`PROGRAMS`: init and the session helper) into ``tmp``; return
    ``tmp``."""
    with steps.step("compiling /sbin/init and the session helper"):
        gcc = shutil.which("gcc")
        if gcc is None:
            raise ImageError("gcc is needed to build the sandbox's init: apt-get install gcc libc6-dev")
        # The sources copied into ``tmp``: what is compiled is what was hashed.
        src = tmp / "src"
        await asyncio.to_thread(src.mkdir)
        for path in c_sources():
            await asyncio.to_thread(shutil.copyfile, path, src / path.name)
        for name, units in PROGRAMS.items():
            # -s: no symbol table, so the binary names no build path.
            code, tail = await run([gcc, "-static", "-Os", "-s", "-o", str(tmp / name), *(str(src / u) for u in units)])
            if code != 0:
                raise ImageError(
                    f"compiling {', '.join(units)} failed (a static libc is needed: apt-get install gcc libc6-dev):\n"
                    + "\n".join(tail)
                )
        return tmp


async def make_rootfs_tar(image: ImageSettings, cache_dir: Path, tarball: Path, detail: Detail) -> None:
    """debootstrap ``image``'s Debian into ``tarball`` (written whole or not at all)."""
    if shutil.which("debootstrap") is None:
        raise ImageError("debootstrap is not installed: apt-get install debootstrap")
    if os.geteuid() != 0:
        raise ImageError("debootstrap must run as root (it creates device nodes and uses chroot)")
    await asyncio.to_thread(cache_dir.mkdir, parents=True, exist_ok=True)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix="rootfs-", suffix=".tmp", dir=cache_dir))
    root = work / "root"
    env = {
        **os.environ,
        "LC_ALL": "C",
        "DEBIAN_FRONTEND": "noninteractive",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    }
    argv = [
        "debootstrap",
        f"--variant={VARIANT}",
        "--include=" + ",".join(packages(image)),
        image.suite,
        str(root),
        image.mirror,
    ]
    try:
        async with asyncio.timeout(DEBOOTSTRAP_TIMEOUT_S):
            code, tail = await run(argv, lambda line: detail(line) if line[:2] in ("I:", "W:", "E:") else None, env)
        if code != 0:
            raise ImageError(f"debootstrap failed with exit code {code}; its last lines:\n" + "\n".join(tail))
        detail("cleaning caches")
        await asyncio.to_thread(_clean_rootfs, root)
        detail(f"writing {tarball.name}")
        part = tarball.with_name(tarball.name + ".part")
        code, tail = await run(
            [
                "tar",
                "--numeric-owner",
                "--xattrs",
                "--xattrs-include=security.capability",
                "--exclude=./dev/*",
                "--exclude=./proc/*",
                "--exclude=./sys/*",
                "-C",
                str(root),
                "-cf",
                str(part),
                ".",
            ]
        )
        if code != 0:
            part.unlink(missing_ok=True)
            raise ImageError("tar of the root file system failed:\n" + "\n".join(tail))
        part.replace(tarball)
    except TimeoutError as exc:
        raise ImageError(f"debootstrap took longer than {DEBOOTSTRAP_TIMEOUT_S:.0f}s") from exc
    finally:
        await asyncio.to_thread(_remove_tree, work)


def _clean_rootfs(root: Path) -> None:
    """Drop what only the bootstrap needed, and whatever names the build host."""
    for pattern in (
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/archives/partial/*",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*_*",
        "var/log/bootstrap.log",
        "debootstrap",
    ):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for name, text in (("etc/hostname", "localhost\n"), ("etc/resolv.conf", "")):  # the engine mounts its own
        (root / name).unlink(missing_ok=True)
        (root / name).write_text(text)


def _mounts_under(path: Path) -> list[str]:
    prefix = str(path)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        points = [re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4]) for line in f]
    return [p for p in points if p == prefix or p.startswith(prefix + "/")]


def _remove_tree(path: Path) -> None:
    """Remove a debootstrap work dir, first unmounting anything a failed run left mounted in it."""
    for point in sorted(_mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "--lazy", point], check=False, capture_output=True)
    if left := _mounts_under(path):
        log.error("leaving %s in place: still mounted: %s", path, ", ".join(left))
        return
    shutil.rmtree(path, ignore_errors=True)


# --- what goes onto the root file system -------------------------------------------------------


def overlay_tar(stage: str, programs: Path) -> bytes:
    """The overlay as root-owned files, plus the setup script and the compiled programs (in ``programs``)
    in ``stage``, where the setup script (``setup.sh STAGE HOSTNAME``) installs them from."""
    buf = io.BytesIO()
    mtime = int(time.time()) - OVERLAY_AGE_S

    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = len(data), mode, mtime, "root", "root"
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in overlay_files():
            add(tar, path.relative_to(ROOTFS_DIR).as_posix(), path.read_bytes(), _mode(path))
        add(tar, f"{stage.strip('/')}/setup.sh", SETUP_SCRIPT.read_bytes(), 0o755)
        for name in PROGRAMS:
            add(tar, f"{stage.strip('/')}/{name}", (programs / name).read_bytes(), 0o755)
    return buf.getvalue()
