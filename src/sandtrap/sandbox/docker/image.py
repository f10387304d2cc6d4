"""Build the sandbox image without a registry: debootstrap, import, then one layer of our own.

What the image is made from, and how, is backend-neutral (:mod:`sandtrap.sandbox.rootfs`); this module is
the Docker part:

1. Import the debootstrapped tarball (``<cache>/rootfs-<hash>.tar``, made first when missing) through the
   engine API as ``sandtrap-base:<hash12>``; or use a local ``base`` image instead.
2. In a helper container with no network: copy in the overlay tar (the ``rootfs/`` overlay, the setup
   script and the compiled programs), run ``rootfs_setup.sh``, commit the result as the target tag.
3. The image carries the hash of every input as a label, so an unchanged rebuild is a no-op and
   ``check_image`` can tell whether the image is current.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import secrets
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiodocker
from aiodocker.containers import DockerContainer
from rich.console import Console

from sandtrap.config import EngineSettings, ImageSettings, SandboxSettings
from sandtrap.errors import ImageError, SandboxError
from sandtrap.sandbox.docker.engine import call, engine, is_not_found
from sandtrap.sandbox.rootfs import (
    Detail,
    Steps,
    compile_programs,
    image_inputs,
    make_rootfs_tar,
    overlay_tar,
    rootfs_digest,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

BASE_REPO = "sandtrap-base"
LABEL_INPUTS = "sandtrap.image.inputs"
LABEL_BASE = "sandtrap.image.base"
IMAGE_ENV = ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8"]
IMPORT_TIMEOUT_S = 900.0
SETUP_TIMEOUT_S = 600.0

__all__ = ["BuildResult", "ImageCheck", "build_image", "check_image", "image_inputs", "rootfs_digest"]


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


# --- public API --------------------------------------------------------------------------------


async def check_image(image: ImageSettings, tag: str, endpoint: EngineSettings | None = None) -> ImageCheck:
    """Is ``tag`` present, and was it built from the current inputs (and from the same base)?"""
    async with engine(endpoint) as docker:
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
    endpoint: EngineSettings | None = None,
    console: Console | None = None,
) -> BuildResult:
    """Build ``tag`` unless it is already current; raise :class:`ImageError` when that fails.

    ``force`` rebuilds our layer even when current; the cached tarball and the imported base image
    are reused (remove ``<cache_dir>/rootfs-*.tar`` and ``sandtrap-base:*`` to debootstrap afresh).
    ``base`` is any local image to build on instead of debootstrapping (nothing can be pulled).
    """
    started = time.monotonic()
    async with engine(endpoint) as docker:
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

        with Steps(console or Console(stderr=True)) as steps, tempfile.TemporaryDirectory() as tmp:
            programs = await compile_programs(Path(tmp), steps)
            base_ref = base or await _debootstrap_base(docker, image, Path(cache_dir), steps)
            image_id = await _build_layer(docker, base_ref, tag, inputs, programs, steps)
        if old is not None and old["Id"] != image_id:
            await _remove_quietly(docker, str(old["Id"]))
    log.info("built %s (%s) in %.0fs", tag, image_id[:19], time.monotonic() - started)
    return BuildResult(tag=tag, image_id=image_id, inputs=inputs, built=True)


# --- engine side -------------------------------------------------------------------------------


async def _debootstrap_base(docker: aiodocker.Docker, image: ImageSettings, cache_dir: Path, steps: Steps) -> str:
    digest = rootfs_digest(image)
    ref = f"{BASE_REPO}:{digest[:12]}"
    if await _inspect(docker, ref) is not None:
        log.info("base image %s already imported", ref)
        return ref
    tarball = cache_dir / f"rootfs-{digest}.tar"
    if not tarball.exists():
        with steps.step(f"debootstrap {image.suite} from {image.mirror}"):
            await make_rootfs_tar(image, cache_dir, tarball, steps.detail)
    with steps.step(f"importing {tarball.name[:19]}… as {ref}"):
        await _import(docker, tarball, ref, steps.detail)
    return ref


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


async def _build_layer(
    docker: aiodocker.Docker, base_ref: str, tag: str, inputs: str, programs: Path, steps: Steps
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
            layer = io.BytesIO(overlay_tar(stage, programs))  # a file object: aiohttp streams it
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
