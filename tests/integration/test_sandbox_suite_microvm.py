"""The conformance suite (tests/sandbox_suite.py) on the micro-VM backend: real QEMU under whatever the probe picks
(TCG here), each box restored from the template's snapshot (the first create makes it, once per image and QEMU
command line; it stays in the image cache). Every VM the suite makes is removed after each test."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator

import pytest
from microvm_helpers import microvm_image, microvm_settings, remove_all

from sandtrap.app import build_backend
from sandtrap.sandbox.base import Sandbox, SandboxBackend
from sandtrap.sandbox.microvm.backend import MicroVMBackend

import sandbox_suite
from sandbox_suite import *  # noqa: F403  (the suite's tests and fixtures, collected here)
from sandbox_suite import MakeBackend

__all__ = ["microvm_image"]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(os.geteuid() != 0, reason="a VM's network namespace and tap need root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="apt-get install qemu-system-x86"),
    pytest.mark.skipif(shutil.which("qemu-img") is None, reason="apt-get install qemu-utils"),
]


@pytest.fixture
async def make_backend(microvm_image: None) -> AsyncIterator[MakeBackend]:
    settings = microvm_settings()
    made: list[MicroVMBackend] = []

    def make() -> SandboxBackend:
        backend = build_backend(settings)
        assert isinstance(backend, MicroVMBackend)
        made.append(backend)
        return backend

    try:
        yield make
    finally:
        make()
        await remove_all(made)


@pytest.mark.xfail(
    strict=True,
    reason="a stopped VM's disk is not read offline yet (its overlay is kept; reading it needs an ext4 reader on the "
    "host that a hostile guest's file system cannot exploit): README Micro-VMs, known gaps",
)
async def test_files_and_changes_stay_readable_after_stop(box: Sandbox) -> None:
    await sandbox_suite.test_files_and_changes_stay_readable_after_stop(box)
