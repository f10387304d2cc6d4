"""Host keys: generated once (ed25519, ecdsa, rsa as OpenSSH's ssh-keygen -A would), then reused."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import asyncssh

log = logging.getLogger(__name__)

# (file name as OpenSSH names it, asyncssh algorithm); RSA at ssh-keygen's default 3072 bits.
_KEYS: list[tuple[str, str]] = [
    ("ssh_host_rsa_key", "ssh-rsa"),
    ("ssh_host_ecdsa_key", "ecdsa-sha2-nistp256"),
    ("ssh_host_ed25519_key", "ssh-ed25519"),
]


def host_key_dir(configured: str, data_dir: Path) -> Path:
    """``ssh.host_key_dir``, or ``<data_dir>/hostkeys`` when it is empty."""
    return Path(configured) if configured else Path(data_dir) / "hostkeys"


def load_host_keys(directory: Path) -> list[asyncssh.SSHKey]:
    """Load the host keys from ``directory``, generating any that are missing (mode 0600)."""
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    keys = []
    for filename, alg in _KEYS:
        path = directory / filename
        if not path.exists():
            log.info("generating host key %s", path)
            key = (
                asyncssh.generate_private_key(alg, key_size=3072)
                if alg == "ssh-rsa"
                else asyncssh.generate_private_key(alg)
            )
            tmp = path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(key.export_private_key("openssh"))
            os.replace(tmp, path)
            (directory / (filename + ".pub")).write_bytes(key.export_public_key("openssh"))
        keys.append(asyncssh.read_private_key(str(path)))
    return keys


def box_host_key_files(directory: Path, hostname: str) -> dict[str, tuple[bytes, int, float]]:
    """The sensor's host keys (``load_host_keys`` first) as files for a box's /etc/ssh: path, content, mode
    (private 0600, public 0644) and time, commented ``root@<hostname>`` as Debian's ``ssh-keygen -A`` leaves
    them, so the key a client saw is the one the box's own sshd serves."""
    files: dict[str, tuple[bytes, int, float]] = {}
    for filename, _alg in _KEYS:
        path = directory / filename
        key = asyncssh.read_private_key(str(path))
        key.set_comment(f"root@{hostname}")
        mtime = path.stat().st_mtime
        files[f"etc/ssh/{filename}"] = (key.export_private_key("openssh"), 0o600, mtime)
        files[f"etc/ssh/{filename}.pub"] = (key.export_public_key("openssh"), 0o644, mtime)
    return files
