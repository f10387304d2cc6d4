"""The micro-VM's disk image, built without mounting anything on the host.

1. The same debootstrap base the Docker image starts from (``sandtrap-base:<hash12>``, imported from the
   cached ``<cache>/rootfs-<hash>.tar`` if missing) runs as a build container *with* network: apt installs
   Debian's kernel and udev there (``box/vm_setup.sh``), then the same overlay and ``rootfs_setup.sh`` as the
   Docker image, then the container-only parts are undone (systemd is PID 1, Debian's own sshd).
2. The container's file system is exported as a tar and unpacked on the host; the sensor's own files
   (host keys, the access key, hostname, the guest's network) are written into that tree.
3. ``mkfs.ext4 -d`` makes a raw ext4 image of the tree (no loop device, no mount), ``qemu-img convert``
   makes it the qcow2 base every VM's overlay sits on. Kernel and initramfs are copied out of the same tree,
   so the guest's ``uname -r`` and ``/lib/modules`` agree.

Everything lands in ``<cache>/microvm-<inputs16>/`` (``disk.qcow2``, ``vmlinuz``, ``initrd.img``,
``manifest.json``), keyed by the hash of every input; an unchanged rebuild is a no-op.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
from rich.console import Console

from sandtrap.config import EngineSettings, ImageSettings
from sandtrap.errors import ImageError, SandboxError
from sandtrap.sandbox import rootfs
from sandtrap.sandbox.docker import image as docker_image
from sandtrap.sandbox.docker.engine import call, engine
from sandtrap.sandbox.microvm import prune

log = logging.getLogger(__name__)

VM_SETUP = rootfs.BOX_DIR / "vm_setup.sh"
LABEL_BUILD = "sandtrap.microvm.build"  # on the build container: what we create, we remove
PREFIX = "microvm-"
MANIFEST = "manifest.json"
SETUP_TIMEOUT_S = 1800.0
EXPORT_TIMEOUT_S = 900.0
MKFS_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class GuestFiles:
    """What the image bakes in for this sensor: the guest's name, network and keys."""

    hostname: str
    domain: str
    address: str  # the guest's eth0, e.g. 10.20.1.13/24
    gateway: str  # the host side of its tap, e.g. 10.20.1.1
    access_key: bytes  # an OpenSSH public key line: root's authorized key for the honeypot
    disk_bytes: int
    planted: dict[str, tuple[bytes, int, float]] = field(default_factory=dict)  # path -> (data, mode, mtime)


@dataclass(frozen=True)
class VMImage:
    directory: Path
    inputs: str
    release: str  # the kernel's `uname -r`

    @property
    def disk(self) -> Path:
        return self.directory / "disk.qcow2"

    @property
    def kernel(self) -> Path:
        return self.directory / "vmlinuz"

    @property
    def initrd(self) -> Path:
        return self.directory / "initrd.img"


def vm_inputs(image: ImageSettings, guest: GuestFiles) -> str:
    """Hex digest of everything the VM image is made from (the Docker image's inputs, ours, the sensor's)."""
    h = hashlib.sha256()

    def feed(name: str, data: bytes) -> None:
        h.update(f"{name}\0{len(data)}\0".encode())
        h.update(data)

    feed("box", rootfs.image_inputs(image).encode())
    feed("vm_setup", VM_SETUP.read_bytes())
    feed("finish", Path(__file__).read_bytes())  # what the host writes into the tree is this module's code
    feed("guest", f"{guest.hostname} {guest.domain} {guest.address} {guest.gateway} {guest.disk_bytes}".encode())
    feed("access_key", guest.access_key)
    for path in sorted(guest.planted):
        if path + ".pub" in guest.planted:  # a private key: its export differs each time (OpenSSH's check int)
            continue
        data, mode, _mtime = guest.planted[path]
        feed(f"planted {path} {mode:o}", data)
    return h.hexdigest()


def image_dir(cache_dir: Path, inputs: str) -> Path:
    return Path(cache_dir) / f"{PREFIX}{inputs[:16]}"


def find_image(cache_dir: Path, inputs: str) -> VMImage | None:
    """The built image for ``inputs``, or None when it is missing or incomplete."""
    directory = image_dir(cache_dir, inputs)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    found = VMImage(directory, str(manifest.get("inputs", "")), str(manifest.get("release", "")))
    if found.inputs != inputs or not all(p.is_file() for p in (found.disk, found.kernel, found.initrd)):
        return None
    prune.mark_used(directory)  # other sensors sharing the cache keep it while it is in use (prune.py)
    return found


async def build_vm_image(
    image: ImageSettings,
    guest: GuestFiles,
    cache_dir: Path,
    *,
    force: bool = False,
    endpoint: EngineSettings | None = None,
    console: Console | None = None,
) -> tuple[VMImage, bool]:
    """Build the VM image unless it is current; return it and whether it was built."""
    cache_dir = Path(cache_dir)
    inputs = vm_inputs(image, guest)
    if not force and (found := find_image(cache_dir, inputs)) is not None:
        log.info("VM image %s is current, nothing to build", found.directory.name)
        return found, False
    for tool, package in (("mkfs.ext4", "e2fsprogs"), ("qemu-img", "qemu-utils"), ("tar", "tar")):
        if shutil.which(tool) is None:
            raise ImageError(f"{tool} is needed to build the VM image: apt-get install {package}")
    started = time.monotonic()
    await asyncio.to_thread(cache_dir.mkdir, parents=True, exist_ok=True)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{PREFIX}build-", suffix=".tmp", dir=cache_dir))
    try:
        with rootfs.Steps(console or Console(stderr=True)) as steps:
            init = await rootfs.compile_programs(work, steps)
            tree = work / "tree"
            async with engine(endpoint) as docker:
                base_ref = await docker_image._debootstrap_base(docker, image, cache_dir, steps)
                await _build_tree(docker, base_ref, inputs, init, guest.hostname, tree, steps)
            with steps.step("writing the sensor's files into the tree"):
                release = await asyncio.to_thread(_finish_tree, tree, guest)
            out = work / "out"
            await asyncio.to_thread(out.mkdir)
            with steps.step(f"kernel {release}: copying vmlinuz and initrd.img"):
                await asyncio.to_thread(shutil.copyfile, tree / "boot" / f"vmlinuz-{release}", out / "vmlinuz")
                await asyncio.to_thread(shutil.copyfile, tree / "boot" / f"initrd.img-{release}", out / "initrd.img")
            raw = work / "disk.raw"
            with steps.step(f"mkfs.ext4 -d ({guest.disk_bytes >> 20} MiB)"):
                fs_uuid = str(uuid.UUID(inputs[:32]))
                await _check(
                    [
                        "mkfs.ext4",
                        "-q",
                        "-F",
                        "-L",
                        "root",
                        "-U",
                        fs_uuid,
                        "-d",
                        str(tree),
                        str(raw),
                        f"{guest.disk_bytes >> 10}k",
                    ],
                    "mkfs.ext4",
                    MKFS_TIMEOUT_S,
                )
            with steps.step("qemu-img convert to qcow2"):
                await _check(
                    ["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(out / "disk.qcow2")],
                    "qemu-img convert",
                    MKFS_TIMEOUT_S,
                )
                await asyncio.to_thread(raw.unlink)
            manifest = {"inputs": inputs, "release": release, "built": time.time(), "fs_uuid": fs_uuid}
            await asyncio.to_thread((out / MANIFEST).write_text, json.dumps(manifest, indent=1) + "\n")
            target = image_dir(cache_dir, inputs)
            if target.exists():
                await asyncio.to_thread(shutil.rmtree, target)
            await asyncio.to_thread(out.rename, target)
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)
    log.info("built VM image %s (kernel %s) in %.0fs", target.name, release, time.monotonic() - started)
    return VMImage(target, inputs, release), True


async def _check(argv: list[str], what: str, timeout_s: float) -> None:
    try:
        async with asyncio.timeout(timeout_s):
            code, tail = await rootfs.run(argv)
    except TimeoutError as exc:
        raise ImageError(f"{what} took longer than {timeout_s:.0f}s") from exc
    if code != 0:
        raise ImageError(f"{what} failed with exit code {code}:\n" + "\n".join(tail))


def _stage_tar(stage: str, init: Path) -> bytes:
    """The overlay, rootfs_setup.sh, init and the session helper (as for the Docker image), and vm_setup.sh."""
    data = bytearray(rootfs.overlay_tar(stage, init))
    buf = io.BytesIO()
    with (
        tarfile.open(fileobj=io.BytesIO(bytes(data)), mode="r") as src,
        tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for member in src.getmembers():
            tar.addfile(member, src.extractfile(member))
        body = VM_SETUP.read_bytes()
        info = tarfile.TarInfo(f"{stage.strip('/')}/vm_setup.sh")
        info.size, info.mode, info.mtime = len(body), 0o755, int(time.time())
        tar.addfile(info, io.BytesIO(body))
    return buf.getvalue()


async def _engine(what: str, aw: Any, timeout_s: float = 60.0) -> Any:
    try:
        return await call(what, aw, timeout_s)
    except SandboxError as exc:
        raise ImageError(str(exc)) from exc


async def _build_tree(
    docker: aiodocker.Docker, base_ref: str, inputs: str, init: Path, hostname: str, tree: Path, steps: Any
) -> None:
    stage = "/tmp/vm-build"
    spec: dict[str, Any] = {
        "Image": base_ref,
        "Entrypoint": [],
        "Cmd": ["sleep", "infinity"],
        "User": "root",
        "WorkingDir": "/",
        "Env": docker_image.IMAGE_ENV,
        "Labels": {LABEL_BUILD: inputs},
        # apt reaches Debian's mirror: the one place the build has a network (the host's: this engine has no bridge).
        "HostConfig": {"NetworkMode": "host"},
    }
    container = await _engine("create the VM build container", docker.containers.create(spec))
    try:
        with steps.step(f"kernel, udev and the box's setup on {base_ref}"):
            layer = io.BytesIO(_stage_tar(stage, init))
            await _engine("copy files into the build container", container.put_archive("/", layer))
            await _engine("start the build container", container.start())
            exe = await _engine(
                "exec vm_setup.sh",
                container.exec(
                    ["/bin/sh", f"{stage}/vm_setup.sh", stage, hostname], user="root", environment={"HOME": "/root"}
                ),
            )
            tail: deque[str] = deque(maxlen=20)

            async def follow() -> None:
                async with exe.start(detach=False) as stream:
                    while (msg := await stream.read_out()) is not None:
                        for line in msg.data.decode(errors="replace").splitlines():
                            tail.append(line)
                            log.debug("vm setup: %s", line)
                            steps.detail(line)

            await _engine("run vm_setup.sh", follow(), SETUP_TIMEOUT_S)
            code = (await _engine("inspect the setup exec", exe.inspect()))["ExitCode"]
            if code != 0:
                raise ImageError(f"vm_setup.sh failed with exit code {code}; its last lines:\n" + "\n".join(tail))
            await _engine("stop the build container", container.kill())
        with steps.step("exporting the file system"):
            await _export(docker, container.id, tree, steps.detail)
    finally:
        try:
            await call("remove the VM build container", container.delete(force=True, v=True))
        except SandboxError as exc:
            log.warning("could not remove build container %s: %s", container.id[:12], exc)


async def _export(docker: aiodocker.Docker, container_id: str, tree: Path, detail: Any) -> None:
    """GET /containers/{id}/export, streamed into ``tar -x`` on the host (owners and xattrs kept)."""
    await asyncio.to_thread(tree.mkdir)
    proc = await asyncio.create_subprocess_exec(
        "tar",
        "--numeric-owner",
        "--same-permissions",
        "--xattrs",
        "--xattrs-include=*",
        "-C",
        str(tree),
        "-xf",
        "-",
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None
    stdin = proc.stdin

    async def stream() -> None:
        got = 0
        async with docker._query(f"containers/{container_id}/export", "GET", timeout=None) as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                got += len(chunk)
                detail(f"{got >> 20} MiB")
                stdin.write(chunk)
                await stdin.drain()
        stdin.close()

    try:
        await _engine("export the build container", stream(), EXPORT_TIMEOUT_S)
        _out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode != 0:
        raise ImageError(f"unpacking the exported file system failed: {err.decode(errors='replace')[-2000:]}")


def _write(path: Path, data: bytes, mode: int, mtime: float | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    path.write_bytes(data)
    path.chmod(mode)
    if mtime is not None:
        os.utime(path, (mtime, mtime))


def _finish_tree(tree: Path, guest: GuestFiles) -> str:
    """Write the sensor's files and what the engine had bind-mounted; return the kernel release."""
    (tree / ".dockerenv").unlink(missing_ok=True)
    fqdn = f"{guest.hostname}.{guest.domain}" if guest.domain else guest.hostname
    address = guest.address.split("/")[0]
    _write(tree / "etc/hostname", f"{guest.hostname}\n".encode(), 0o644)
    # Empty, as Debian's cloud images ship it: systemd makes the id at first boot (in a VM from QEMU's -uuid,
    # unique per VM), holds it over the read-only root, and systemd-machine-id-commit writes it once root is rw.
    _write(tree / "etc/machine-id", b"", 0o444)
    hosts = (
        f"127.0.0.1\tlocalhost\n{address}\t{fqdn} {guest.hostname}\n\n"
        "# The following lines are desirable for IPv6 capable hosts\n"
        "::1     localhost ip6-localhost ip6-loopback\nff02::1 ip6-allnodes\nff02::2 ip6-allrouters\n"
    )
    _write(tree / "etc/hosts", hosts.encode(), 0o644)
    search = f"search {guest.domain}\n" if guest.domain else ""
    _write(tree / "etc/resolv.conf", f"{search}nameserver {guest.gateway}\n".encode(), 0o644)
    _write(
        tree / "etc/fstab",
        b"# <file system> <mount point> <type> <options> <dump> <pass>\n/dev/vda / ext4 errors=remount-ro 0 1\n",
        0o644,
    )
    interfaces = (
        "# The primary network interface\n"
        f"auto eth0\niface eth0 inet static\n\taddress {guest.address}\n\tgateway {guest.gateway}\n"
    )
    _write(tree / "etc/network/interfaces.d/eth0", interfaces.encode(), 0o644)
    for rel, (data, mode, mtime) in guest.planted.items():
        _write(tree / rel.lstrip("/"), data, mode, mtime)
    keys = tree / "root/.ssh/authorized_keys"
    old = keys.read_bytes() if keys.exists() else b""
    _write(keys, old + guest.access_key.rstrip(b"\n") + b"\n", 0o600)
    releases = sorted(p.name.removeprefix("vmlinuz-") for p in (tree / "boot").glob("vmlinuz-*"))
    if len(releases) != 1:
        raise ImageError(f"expected one kernel in the image's /boot, found {releases or 'none'}")
    release = releases[0]
    if not (tree / "lib/modules" / release).is_dir() or not (tree / "boot" / f"initrd.img-{release}").is_file():
        raise ImageError(f"kernel {release}: /lib/modules/{release} or its initrd.img is missing from the image")
    return release
