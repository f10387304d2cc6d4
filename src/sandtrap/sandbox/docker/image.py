"""Build the sandbox image without a registry: debootstrap, import, then one layer of our own.

1. ``debootstrap`` a Debian root file system into ``<cache>/rootfs-<hash>.tar`` (kept; rebuilt only
   when missing) and import it through the engine API as ``sandtrap-base:<hash12>``; or use a local
   ``base`` image instead.
2. In a helper container with no network: copy the ``rootfs/`` overlay and a static ``/sbin/init``
   compiled from ``init.c``, run ``rootfs_setup.sh``, commit the result as the target tag.
3. The image carries the hash of every input as a label, so an unchanged rebuild is a no-op and
   ``check_image`` can tell whether the image is current.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import tarfile
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
from aiodocker.containers import DockerContainer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from sandtrap.config import ImageSettings, SandboxSettings
from sandtrap.errors import ImageError, SandboxError
from sandtrap.sandbox.docker.engine import call, engine, is_not_found

log = logging.getLogger(__name__)
T = TypeVar("T")

HERE = Path(__file__).resolve().parents[2] / "box"  # the in-box payload
ROOTFS_DIR = HERE / "rootfs"
SETUP_SCRIPT = HERE / "rootfs_setup.sh"
INIT_SOURCE = HERE / "init.c"
LISTENER_SOURCE = HERE / "listener.c"  # included by init.c: the SSH listener and session broker
SESSION_SOURCE = HERE / "session.c"  # sshd's session work in the box (utmp, motd, login shell)
ACCOUNTS_HEADER = HERE / "accounts.h"  # included by listener.c and session.c: /etc/passwd and /etc/group
RELAY_HEADER = HERE / "relay.h"  # included by listener.c: the session's TCP connection to :22

VARIANT = "minbase"
BASE_REPO = "sandtrap-base"
LABEL_INPUTS = "sandtrap.image.inputs"
LABEL_BASE = "sandtrap.image.base"
IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
DEBOOTSTRAP_TIMEOUT_S = 1800.0
IMPORT_TIMEOUT_S = 900.0
SETUP_TIMEOUT_S = 600.0
OVERLAY_AGE_S = 150 * 86400  # overlay files look this old unless the setup script says otherwise

Detail = Callable[[str], None]


@dataclass
class ImageCheck:
    present: bool
    current: bool
    expected: str  # inputs hash the current sources and settings give
    actual: str | None  # inputs hash the image was built from (None when absent or unlabelled)


@dataclass
class BuildResult:
    tag: str
    image_id: str
    inputs: str
    built: bool  # False when the image was already current


# --- inputs ------------------------------------------------------------------------------------


def _packages(image: ImageSettings) -> list[str]:
    return sorted(set(image.packages) | set(image.extra_packages))


def rootfs_digest(image: ImageSettings) -> str:
    """Hash of what debootstrap is asked for; names the cached tarball and the base image."""
    spec = {"suite": image.suite, "mirror": image.mirror, "variant": VARIANT, "packages": _packages(image)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _overlay_files() -> list[Path]:
    return sorted(
        p for p in ROOTFS_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def _mode(path: Path) -> int:
    return 0o755 if path.stat().st_mode & 0o111 else 0o644


def image_inputs(image: ImageSettings, base: str | None = None) -> str:
    """Hex digest of everything the image is made from.

    ``base`` is the id of a local base image (``build_image`` resolves a reference to its id);
    without it, the debootstrap inputs count instead.
    """
    h = hashlib.sha256()

    def feed(name: str, data: bytes) -> None:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)

    feed("base", f"image {base}".encode() if base else f"debootstrap {rootfs_digest(image)}".encode())
    for path in _overlay_files():
        feed(f"rootfs/{path.relative_to(ROOTFS_DIR).as_posix()} {_mode(path):o}", path.read_bytes())
    feed("setup", SETUP_SCRIPT.read_bytes())
    feed("init", INIT_SOURCE.read_bytes())
    feed("listener", LISTENER_SOURCE.read_bytes())
    feed("session", SESSION_SOURCE.read_bytes())
    feed("accounts", ACCOUNTS_HEADER.read_bytes())
    feed("relay", RELAY_HEADER.read_bytes())
    return h.hexdigest()


# --- public API --------------------------------------------------------------------------------


async def check_image(image: ImageSettings, tag: str, docker_host: str = "") -> ImageCheck:
    """Is ``tag`` present, and was it built from the current inputs (and from the same base)?"""
    async with engine(docker_host) as docker:
        info = await _inspect(docker, tag)
        if info is None:
            return ImageCheck(present=False, current=False, expected=image_inputs(image), actual=None)
        labels = info["Config"].get("Labels") or {}
        base_ref = str(labels.get(LABEL_BASE, ""))
        base_id = None
        if base_ref and not base_ref.startswith(BASE_REPO + ":"):  # built on a user-supplied base
            base_info = await _inspect(docker, base_ref)
            base_id = str(base_info["Id"]) if base_info else f"missing {base_ref}"
        expected = image_inputs(image, base_id)
        actual = labels.get(LABEL_INPUTS)
        return ImageCheck(present=True, current=actual == expected, expected=expected, actual=actual)


async def build_image(
    image: ImageSettings,
    tag: str,
    cache_dir: Path,
    *,
    base: str | None = None,
    force: bool = False,
    docker_host: str = "",
    console: Console | None = None,
) -> BuildResult:
    """Build ``tag`` unless it is already current; raise :class:`ImageError` when that fails.

    ``force`` rebuilds our layer even when current; the cached tarball and the imported base image
    are reused (remove ``<cache_dir>/rootfs-*.tar`` and ``sandtrap-base:*`` to debootstrap afresh).
    ``base`` is any local image to build on instead of debootstrapping (nothing can be pulled).
    """
    started = time.monotonic()
    async with engine(docker_host) as docker:
        base_id = None
        if base is not None:
            base_info = await _inspect(docker, base)
            if base_info is None:
                raise ImageError(
                    f"base image {base!r} is not present locally and nothing can be pulled here; "
                    "load it first (docker load) or build without a base"
                )
            base_id = str(base_info["Id"])
        inputs = image_inputs(image, base_id)
        old = await _inspect(docker, tag)
        if old is not None and not force and (old["Config"].get("Labels") or {}).get(LABEL_INPUTS) == inputs:
            log.info("image %s is current (inputs %s), nothing to build", tag, inputs[:12])
            return BuildResult(tag=tag, image_id=str(old["Id"]), inputs=inputs, built=False)

        with _Steps(console or Console(stderr=True)) as steps, tempfile.TemporaryDirectory() as tmp:
            init = await _compile_init(Path(tmp), steps)
            base_ref = base or await _debootstrap_base(docker, image, Path(cache_dir), steps)
            image_id = await _build_layer(docker, base_ref, tag, inputs, init, steps)
        if old is not None and old["Id"] != image_id:
            await _remove_quietly(docker, str(old["Id"]))
    log.info("built %s (%s) in %.0fs", tag, image_id[:19], time.monotonic() - started)
    return BuildResult(tag=tag, image_id=image_id, inputs=inputs, built=True)


# --- progress ----------------------------------------------------------------------------------


class _Steps:
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

    def __enter__(self) -> _Steps:
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


# --- host side: init and the Debian root file system -------------------------------------------


async def _run(
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


async def _compile_init(tmp: Path, steps: _Steps) -> Path:
    """Compile the box's own programs (init and the session helper) into ``tmp``; return ``tmp``."""
    with steps.step("compiling /sbin/init and the session helper"):
        gcc = shutil.which("gcc")
        if gcc is None:
            raise ImageError("gcc is needed to build the sandbox's init: apt-get install gcc libc6-dev")
        # The sources copied into ``tmp``: what is compiled is what was hashed.
        src = tmp / "src"
        await asyncio.to_thread(src.mkdir)
        for path in (INIT_SOURCE, LISTENER_SOURCE, SESSION_SOURCE, ACCOUNTS_HEADER, RELAY_HEADER):
            await asyncio.to_thread(shutil.copyfile, path, src / path.name)
        for source, name in ((INIT_SOURCE, "init"), (SESSION_SOURCE, "session")):
            # -s: no symbol table, so the binary names no build path.
            code, tail = await _run([gcc, "-static", "-Os", "-s", "-o", str(tmp / name), str(src / source.name)])
            if code != 0:
                raise ImageError(
                    f"compiling {source.name} failed (a static libc is needed: apt-get install gcc libc6-dev):\n"
                    + "\n".join(tail)
                )
        return tmp


async def _debootstrap_base(docker: aiodocker.Docker, image: ImageSettings, cache_dir: Path, steps: _Steps) -> str:
    digest = rootfs_digest(image)
    ref = f"{BASE_REPO}:{digest[:12]}"
    if await _inspect(docker, ref) is not None:
        log.info("base image %s already imported", ref)
        return ref
    tarball = cache_dir / f"rootfs-{digest}.tar"
    if not tarball.exists():
        with steps.step(f"debootstrap {image.suite} from {image.mirror}"):
            await _make_rootfs_tar(image, cache_dir, tarball, steps.detail)
    with steps.step(f"importing {tarball.name[:19]}… as {ref}"):
        await _import(docker, tarball, ref, steps.detail)
    return ref


async def _make_rootfs_tar(image: ImageSettings, cache_dir: Path, tarball: Path, detail: Detail) -> None:
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
        "--include=" + ",".join(_packages(image)),
        image.suite,
        str(root),
        image.mirror,
    ]
    try:
        async with asyncio.timeout(DEBOOTSTRAP_TIMEOUT_S):
            code, tail = await _run(argv, lambda line: detail(line) if line[:2] in ("I:", "W:", "E:") else None, env)
        if code != 0:
            raise ImageError(f"debootstrap failed with exit code {code}; its last lines:\n" + "\n".join(tail))
        detail("cleaning caches")
        await asyncio.to_thread(_clean_rootfs, root)
        detail(f"writing {tarball.name}")
        part = tarball.with_name(tarball.name + ".part")
        code, tail = await _run(
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


# --- engine side -------------------------------------------------------------------------------


async def _engine(what: str, aw: Awaitable[T], timeout_s: float = 60.0) -> T:
    try:
        return await call(what, aw, timeout_s)
    except SandboxError as exc:
        raise ImageError(str(exc)) from exc


async def _inspect(docker: aiodocker.Docker, ref: str) -> dict[str, Any] | None:
    try:
        return await _engine(f"inspect image {ref}", docker.images.inspect(ref))
    except ImageError as exc:
        if is_not_found(exc.__cause__ or exc):
            return None
        raise


async def _remove_quietly(docker: aiodocker.Docker, image_id: str) -> None:
    """Drop the image a rebuild replaced; keep it if a (stopped) sandbox still uses it."""
    try:
        await _engine(f"remove old image {image_id[:19]}", docker.images.delete(image_id))
    except ImageError as exc:
        log.info("kept the previous image: %s", exc)


def _split_ref(ref: str) -> tuple[str, str]:
    name, _, tag = ref.rpartition(":")
    return (name, tag) if name and "/" not in tag else (ref, "latest")


async def _import(docker: aiodocker.Docker, tarball: Path, ref: str, detail: Detail) -> None:
    """POST /images/create?fromSrc=- with the tarball streamed as the body."""
    total_mib = (await asyncio.to_thread(tarball.stat)).st_size >> 20

    async def body() -> AsyncIterator[bytes]:
        sent = 0
        with tarball.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, 1 << 20):
                sent += len(chunk)
                detail(f"{sent >> 20} of {total_mib} MiB")
                yield chunk

    async def upload() -> None:
        repo, tag = _split_ref(ref)
        async with docker._query(
            "images/create",
            "POST",
            params={"fromSrc": "-", "repo": repo, "tag": tag},
            data=body(),
            headers={"Content-Type": "application/x-tar"},
            timeout=None,
            chunked=True,
        ) as response:
            text = await response.text()
        for line in filter(None, map(str.strip, text.splitlines())):
            if "error" in (msg := json.loads(line)):
                raise ImageError(f"the engine refused to import {tarball.name}: {msg['error']}")

    await _engine(f"import {tarball.name}", upload(), IMPORT_TIMEOUT_S)


def _overlay_tar(stage: str, init: Path) -> bytes:
    """The overlay as root-owned files, plus the setup script and init in ``stage``."""
    buf = io.BytesIO()
    mtime = int(time.time()) - OVERLAY_AGE_S

    def add(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime, info.uname, info.gname = len(data), mode, mtime, "root", "root"
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in _overlay_files():
            add(tar, path.relative_to(ROOTFS_DIR).as_posix(), path.read_bytes(), _mode(path))
        add(tar, f"{stage.strip('/')}/setup.sh", SETUP_SCRIPT.read_bytes(), 0o755)
        add(tar, f"{stage.strip('/')}/init", (init / "init").read_bytes(), 0o755)
        add(tar, f"{stage.strip('/')}/session", (init / "session").read_bytes(), 0o755)
    return buf.getvalue()


async def _build_layer(
    docker: aiodocker.Docker, base_ref: str, tag: str, inputs: str, init: Path, steps: _Steps
) -> str:
    stage = f"/tmp/build-{secrets.token_hex(4)}"
    helper: dict[str, Any] = {
        "Image": base_ref,
        "Entrypoint": [],
        "Cmd": ["sleep", "infinity"],
        "User": "root",
        "WorkingDir": "/",
        "Env": IMAGE_ENV,
        "HostConfig": {"NetworkMode": "none"},
    }
    commit: dict[str, Any] = {
        "Entrypoint": [],
        "Cmd": ["/sbin/init"],
        "WorkingDir": "/root",
        "Env": IMAGE_ENV,
        "StopSignal": "SIGTERM",
        "Labels": {LABEL_INPUTS: inputs, LABEL_BASE: base_ref},
    }
    with steps.step(f"building {tag} on {base_ref}"):
        container = await _engine("create the build container", docker.containers.create(helper))
        try:
            steps.detail("copying files")
            layer = io.BytesIO(_overlay_tar(stage, init))  # a file object: aiohttp streams it
            await _engine("copy files into the build container", container.put_archive("/", layer))  # type: ignore[no-untyped-call]
            await _engine("start the build container", container.start())
            await _run_setup(container, stage, steps.detail)
            steps.detail("committing")
            repo, name = _split_ref(tag)
            result = await _engine(
                "commit the image", container.commit(repository=repo, tag=name, config=commit), 600.0
            )
            return str(result["Id"])
        finally:
            try:
                await call("remove the build container", container.delete(force=True, v=True))
            except SandboxError as exc:
                log.warning("could not remove build container %s: %s", container.id[:12], exc)


async def _run_setup(container: DockerContainer, stage: str, detail: Detail) -> None:
    hostname = SandboxSettings().hostname  # only for historic log lines; the live one is set at run time
    exe = await _engine(
        "exec the setup script",
        container.exec(["/bin/sh", f"{stage}/setup.sh", stage, hostname], user="root", environment={"HOME": "/root"}),
    )
    tail: deque[str] = deque(maxlen=20)

    async def follow() -> None:
        async with exe.start(detach=False) as stream:
            while (msg := await stream.read_out()) is not None:
                for line in msg.data.decode(errors="replace").splitlines():
                    tail.append(line)
                    log.debug("setup: %s", line)
                    detail(line)

    await _engine("run the setup script", follow(), SETUP_TIMEOUT_S)
    code = (await _engine("inspect the setup exec", exe.inspect()))["ExitCode"]
    if code != 0:
        raise ImageError(f"the setup script failed with exit code {code}; its last lines:\n" + "\n".join(tail))
