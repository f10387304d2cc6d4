"""Files written into every box before its init runs (the sensor's SSH host keys)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import asyncssh
import pytest

from sandtrap.sandbox.docker.spec import files_archive
from sandtrap.ssh.hostkeys import box_host_key_files, host_key_dir, load_host_keys


def test_archive_holds_root_owned_files_with_their_modes_and_times() -> None:
    data = files_archive({"etc/ssh/k": (b"secret", 0o600, 1_700_000_000.5), "etc/ssh/k.pub": (b"pub", 0o644, 1.0)})
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name: m for m in tar.getmembers()}
        assert set(members) == {"etc/ssh/k", "etc/ssh/k.pub"}
        k = members["etc/ssh/k"]
        assert (k.mode, k.uid, k.gid, k.mtime, k.isfile()) == (0o600, 0, 0, 1_700_000_000, True)
        assert tar.extractfile(k).read() == b"secret"  # type: ignore[union-attr]


@pytest.mark.parametrize("name", ["/etc/passwd", "etc/../../x", "../x"])
def test_archive_refuses_paths_outside_the_root(name: str) -> None:
    with pytest.raises(ValueError, match="relative path"):
        files_archive({name: (b"x", 0o644, 0.0)})


def test_box_host_keys_are_the_sensors_with_debians_comment(tmp_path: Path) -> None:
    keys = load_host_keys(tmp_path)
    files = box_host_key_files(tmp_path, "web-prod-03")
    assert sorted(files) == sorted(
        f"etc/ssh/ssh_host_{t}_key{ext}" for t in ("rsa", "ecdsa", "ed25519") for ext in ("", ".pub")
    )
    for key in keys:
        name = {"ssh-rsa": "rsa", "ecdsa-sha2-nistp256": "ecdsa", "ssh-ed25519": "ed25519"}[key.algorithm.decode()]
        private, mode, _ = files[f"etc/ssh/ssh_host_{name}_key"]
        public, pub_mode, _ = files[f"etc/ssh/ssh_host_{name}_key.pub"]
        assert (mode, pub_mode) == (0o600, 0o644)
        copy = asyncssh.import_private_key(private)
        assert copy.export_public_key().split()[1] == key.export_public_key().split()[1]
        assert public.decode().split()[1] == key.export_public_key().decode().split()[1]
        assert public.decode().rstrip("\n").endswith(" root@web-prod-03")


def test_host_key_dir_defaults_to_the_data_dir(tmp_path: Path) -> None:
    assert host_key_dir("", tmp_path) == tmp_path / "hostkeys"
    assert host_key_dir("/etc/sandtrap/keys", tmp_path) == Path("/etc/sandtrap/keys")
