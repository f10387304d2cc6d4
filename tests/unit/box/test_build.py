"""The box's programs compile and link from box/'s C files alone, warning-free (the image build compiles them
statically; this is the same set of files at unit speed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from sandtrap.sandbox import rootfs


@pytest.mark.parametrize("program", sorted(rootfs.PROGRAMS))
def test_the_program_compiles_from_the_hashed_sources(program: str, tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to compile the box's programs")
    src = tmp_path / "src"
    src.mkdir()
    for path in rootfs.c_sources():  # only what the image's cache key covers
        shutil.copyfile(path, src / path.name)
    units = [str(src / unit) for unit in rootfs.PROGRAMS[program]]
    flags = ["-std=gnu11", "-Os", "-Wall", "-Wextra", "-Werror"]
    done = subprocess.run([gcc, *flags, "-o", str(tmp_path / program), *units], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
