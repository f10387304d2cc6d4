"""What the micro-VM integration tests share: their settings (one data dir, so one image and one template), the
image fixture, and removing every VM of that data dir afterwards."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from sandtrap.app import cache_dir, vm_planted_files
from sandtrap.config import Settings, merge
from sandtrap.sandbox.microvm import qemu
from sandtrap.sandbox.microvm.backend import MicroVMBackend, access_key_path, guest_files
from sandtrap.sandbox.microvm.guest import load_access_key
from sandtrap.sandbox.microvm.image import build_vm_image

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "microvm-test"  # test_microvm.py's: the same keys, so the same image and template


def microvm_settings(overrides: dict[str, Any] | None = None) -> Settings:
    base: dict[str, Any] = {
        "storage": {"data_dir": str(DATA)},
        "image": {"cache_dir": str(ROOT / "data" / "cache")},
        "sandbox": {"backend": "microvm", "microvm": {"memory": "512m", "vcpus": 1}},
    }
    return Settings.model_validate(merge(base, overrides or {}))


@pytest.fixture(scope="session")
def microvm_image() -> None:
    settings = microvm_settings()
    key = load_access_key(access_key_path(settings.data_dir / "microvm"))
    # What the backend bakes in (vm_planted_files: the capture gateway's CA too): one image for every VM test.
    guest = guest_files(settings.sandbox, key, vm_planted_files(settings))
    asyncio.run(build_vm_image(settings.image, guest, cache_dir(settings), console=Console(quiet=True)))


async def remove_all(made: list[MicroVMBackend]) -> None:
    """Every VM of this data dir, whoever made it, removed; then no QEMU of it may be left."""
    backend = made[-1]
    for info in await backend.list_managed():
        await backend.sandbox(info.id, info.name).remove()
    for other in made:
        await other.close()
    left = [n for n, pid in qemu.find_qemus("sandtrap-vm-").items() if str(DATA) in cmdline(pid)]
    assert left == [], f"QEMUs left running: {left}"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""
