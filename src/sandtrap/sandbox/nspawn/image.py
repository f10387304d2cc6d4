"""The nspawn boxes' tree: the Docker image's file system, unpacked once into the cache.

The same root file system, lures, init and session helper as the Docker boxes: ``sandtrap image build`` builds
(or reuses) the Docker image from the backend-neutral inputs (:mod:`sandtrap.sandbox.rootfs`), then exports a
container of it (never started) into ``<cache>/nspawn-<inputs16>/tree`` with owners, modes and xattrs kept.
Every box's overlay has that tree as its lowest layer, read-only. ``manifest.json`` is written last: a tree
without it is incomplete and is built again. An unchanged rebuild is a no-op (keyed by every input).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import aiodocker
from rich.console import Console

from sandtrap.config import EngineSettings, ImageSettings
from sandtrap.errors import ImageError, SandboxError
from sandtrap.sandbox import rootfs
from sandtrap.sandbox.docker.engine import call, engine
from sandtrap.sandbox.docker.image import build_image

log = logging.getLogger(__name__)

PREFIX = "nspawn-"
MANIFEST = "manifest.json"
EXPORT_TIMEOUT_S = 900.0


def tree_inputs(image: ImageSettings) -> str:
    """Hex digest of what the tree is made from: the Docker image's inputs and this module."""
    h = hashlib.sha256()
    h.update(b"nspawn-tree\0" + rootfs.image_inputs(image).encode() + b"\0")
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()


def tree_dir(cache_dir: Path, inputs: str) -> Path:
    return Path(cache_dir) / f"{PREFIX}{inputs[:16]}"


def find_tree(cache_dir: Path, inputs: str) -> Path | None:
    """The complete tree for ``inputs``, or None."""
    directory = tree_dir(cache_dir, inputs)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    tree = directory / "tree"
    return tree if manifest.get("inputs") == inputs and (tree / "sbin" / "init").is_file() else None


async def build_tree(
    image: ImageSettings,
    tag: str,
    cache_dir: Path,
    *,
    force: bool = False,
    endpoint: EngineSettings | None = None,
    console: Console | None = None,
) -> tuple[Path, bool]:
    """Build the tree unless it is current; return it and whether it was built."""
    cache_dir = Path(cache_dir)
    inputs = tree_inputs(image)
    if not force and (found := find_tree(cache_dir, inputs)) is not None:
        log.info("nspawn tree %s is current, nothing to build", found.parent.name)
        return found, False
    started = time.monotonic()
    built = await build_image(image, tag, cache_dir, force=force, endpoint=endpoint, console=console)
    await asyncio.to_thread(cache_dir.mkdir, parents=True, exist_ok=True)
    work = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{PREFIX}build-", suffix=".tmp", dir=cache_dir))
    try:
        with rootfs.Steps(console or Console(stderr=True)) as steps:
            with steps.step(f"unpacking {tag} into a tree"):
                tree = work / "tree"
                await asyncio.to_thread(tree.mkdir, 0o755)
                async with engine(endpoint) as docker:
                    await _export(docker, built.image_id, tree, steps.detail)
                await asyncio.to_thread(_finish, tree)
            manifest = {"inputs": inputs, "image": built.image_id, "built": time.time()}
            await asyncio.to_thread((work / MANIFEST).write_text, json.dumps(manifest, indent=1) + "\n")
            target = tree_dir(cache_dir, inputs)
            if not force and (found := find_tree(cache_dir, inputs)) is not None:
                # another build of the same inputs published first (two test runs, two sandtraps): boxes may
                # already run on it, so it stays and this copy goes
                log.info("nspawn tree %s was built alongside; keeping that one", target.name)
                await asyncio.to_thread(shutil.rmtree, work, True)
                return found, False
            if target.exists():
                await asyncio.to_thread(shutil.rmtree, target)
            await asyncio.to_thread(work.rename, target)
    except BaseException:
        await asyncio.to_thread(shutil.rmtree, work, True)
        raise
    log.info("built nspawn tree %s in %.0fs", target.name, time.monotonic() - started)
    return target / "tree", True


def _finish(tree: Path) -> None:
    """What the engine put into the export that a box must not have (its marker); the box's seed layer
    brings hostname, hosts and resolv.conf."""
    (tree / ".dockerenv").unlink(missing_ok=True)
    tree.chmod(0o755)


async def _export(docker: aiodocker.Docker, image_id: str, tree: Path, detail: object) -> None:
    """A created (never started) container of the image, exported into ``tar -x`` (owners and xattrs kept)."""
    try:
        container = await call("create the export container", docker.containers.create({"Image": image_id}))
    except SandboxError as exc:
        raise ImageError(str(exc)) from exc
    proc = await asyncio.create_subprocess_exec(
        "tar", "--numeric-owner", "--same-permissions", "--xattrs", "--xattrs-include=*", "-C", str(tree), "-xf", "-",
        stdin=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stdin is not None
    stdin = proc.stdin

    async def stream() -> None:
        got = 0
        async with docker._query(f"containers/{container.id}/export", "GET", timeout=None) as response:
            async for chunk in response.content.iter_chunked(1 << 20):
                got += len(chunk)
                if callable(detail):
                    detail(f"{got >> 20} MiB")
                stdin.write(chunk)
                await stdin.drain()
        stdin.close()

    try:
        await call("export the image's file system", stream(), EXPORT_TIMEOUT_S)
        _out, err = await proc.communicate()
    except SandboxError as exc:
        raise ImageError(str(exc)) from exc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        try:
            await call("remove the export container", container.delete(force=True))
        except SandboxError as exc:
            log.warning("could not remove export container %s: %s", container.id[:12], exc)
    if proc.returncode != 0:
        raise ImageError(f"unpacking the exported file system failed: {err.decode(errors='replace')[-2000:]}")
