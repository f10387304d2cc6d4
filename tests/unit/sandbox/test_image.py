"""image_inputs: one hash over everything the sandbox image is made from (sandbox/rootfs.py, for any backend)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from sandtrap.config import ImageSettings
from sandtrap.sandbox import rootfs as image_module
from sandtrap.sandbox.docker.image import image_inputs, rootfs_digest


@pytest.fixture
def overlay(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the rootfs overlay that the module reads instead of the shipped one."""
    copy = tmp_path / "rootfs"
    shutil.copytree(image_module.ROOTFS_DIR, copy, symlinks=True)
    monkeypatch.setattr(image_module, "ROOTFS_DIR", copy)
    return copy


def test_same_inputs_give_the_same_hash(overlay: Path) -> None:
    assert image_inputs(ImageSettings()) == image_inputs(ImageSettings())
    assert re.fullmatch(r"[0-9a-f]{64}", image_inputs(ImageSettings()))


def test_package_order_and_duplicates_do_not_matter() -> None:
    packages = ImageSettings().packages
    shuffled = ImageSettings(packages=list(reversed(packages)), extra_packages=[packages[0]])
    assert rootfs_digest(shuffled) == rootfs_digest(ImageSettings())
    assert image_inputs(shuffled) == image_inputs(ImageSettings())


@pytest.mark.parametrize(
    "change",
    [
        {"extra_packages": ["jq"]},
        {"packages": ["bash", "coreutils"]},
        {"suite": "trixie"},
        {"mirror": "http://ftp.de.debian.org/debian"},
    ],
)
def test_debootstrap_inputs_change_the_hash(change: dict[str, object]) -> None:
    changed = ImageSettings.model_validate(change)
    assert rootfs_digest(changed) != rootfs_digest(ImageSettings())
    assert image_inputs(changed) != image_inputs(ImageSettings())


def test_editing_an_overlay_file_changes_the_hash(overlay: Path) -> None:
    before = image_inputs(ImageSettings())
    history = overlay / "root" / ".bash_history"
    history.write_text(history.read_text() + "uptime\n")
    assert image_inputs(ImageSettings()) != before


def test_adding_an_overlay_file_or_an_exec_bit_changes_the_hash(overlay: Path) -> None:
    before = image_inputs(ImageSettings())
    extra = overlay / "etc" / "cron.d" / "logrotate-extra"
    extra.write_text("# nothing\n")
    added = image_inputs(ImageSettings())
    assert added != before
    extra.chmod(0o755)
    assert image_inputs(ImageSettings()) not in (before, added)


def test_bytecode_caches_in_the_overlay_are_ignored(overlay: Path) -> None:
    before = image_inputs(ImageSettings())
    cache = overlay / "var" / "www" / "pycache-test" / "__pycache__"
    cache.mkdir(parents=True)
    (cache / "app.cpython-311.pyc").write_bytes(b"\0" * 16)
    assert image_inputs(ImageSettings()) == before


def test_a_base_image_replaces_the_debootstrap_inputs(overlay: Path) -> None:
    debootstrapped = image_inputs(ImageSettings())
    on_base = image_inputs(ImageSettings(), base="sha256:" + "a" * 64)
    assert on_base != debootstrapped
    assert image_inputs(ImageSettings(extra_packages=["jq"]), base="sha256:" + "a" * 64) == on_base
    assert image_inputs(ImageSettings(), base="sha256:" + "b" * 64) != on_base


def test_setup_script_and_c_sources_count(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    before = image_inputs(ImageSettings())
    copy = tmp_path / "setup.sh"
    copy.write_bytes(image_module.SETUP_SCRIPT.read_bytes() + b"\n")
    with monkeypatch.context() as m:
        m.setattr(image_module, "SETUP_SCRIPT", copy)
        assert image_inputs(ImageSettings()) != before
    box = tmp_path / "box"
    box.mkdir()
    for path in image_module.c_sources():
        shutil.copyfile(path, box / path.name)
    monkeypatch.setattr(image_module, "BOX_DIR", box)
    assert image_inputs(ImageSettings()) == before
    for path in sorted(box.iterdir()):
        original = path.read_bytes()
        path.write_bytes(original + b"\n")
        assert image_inputs(ImageSettings()) != before, path.name
        path.write_bytes(original)
    (box / "new.h").write_text("/* a header a program may include */\n")
    assert image_inputs(ImageSettings()) != before


def test_every_c_file_of_the_box_is_compiled_and_every_input_exists() -> None:
    """The cache key covers what the compiler sees (every box/*.c and *.h); each .c belongs to a program."""
    sources = {p.name for p in image_module.c_sources()}
    linked = [unit for units in image_module.PROGRAMS.values() for unit in units]
    assert sorted(linked) == sorted({n for n in sources if n.endswith(".c")})
    assert {"protocol.h", "wire.h", "listener.h", "accounts.h", "relay.h"} <= sources


def test_nothing_shipped_into_the_image_gives_the_trap_away() -> None:
    shipped = [p for p in image_module.ROOTFS_DIR.rglob("*") if p.is_file()]
    shipped += [image_module.SETUP_SCRIPT, *image_module.c_sources()]
    for path in shipped:
        text = path.read_bytes().lower()
        for word in (b"sandtrap", b"honeypot"):
            assert word not in text, f"{path} contains {word!r}"
