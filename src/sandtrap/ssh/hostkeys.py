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
