"""What a Docker backend shares with its boxes (:class:`BoxHost`) and where a running box's files are on this
host (:class:`HostView`)."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker

from sandtrap.sandbox.docker.process import DockerProcess
from sandtrap.sandbox.host.inotify import OpenWatcher


@dataclass
class BoxHost:
    """What a backend shares with its boxes: the engine client, the sensor, the processes to close with the
    client, and the host's watch on reads."""

    client: aiodocker.Docker
    sensor: str
    local: bool = False  # the engine runs on this host (a unix socket)
    reads: OpenWatcher = field(default_factory=OpenWatcher)
    open_processes: weakref.WeakSet[DockerProcess] = field(default_factory=weakref.WeakSet)
    stopped: list[Callable[[str], object]] = field(default_factory=list)  # told each box id stopped or removed


@dataclass(frozen=True)
class HostView:
    """Where a running box's files are on this host (see :mod:`sandtrap.sandbox.host.hostfs`)."""

    pid: int
    mnt_ns: int  # the inode of pid 1's mount namespace: proves the pid was not reused
    upper: str
    lowers: list[str]
    tmpfs: list[str]
    volumes: list[str]
    address: str = ""  # its eth0's IPv4 address (sandbox.network: internal), '' = none

    @property
    def root(self) -> str:
        return f"/proc/{self.pid}/root"

    def verify(self) -> bool:
        try:
            return Path(f"/proc/{self.pid}/ns/mnt").stat().st_ino == self.mnt_ns
        except OSError:
            return False

    @classmethod
    def from_inspect(cls, info: Mapping[str, Any]) -> HostView | None:
        """None when the box is not running or its files are not on this host (a remote engine)."""
        state = info.get("State") or {}
        pid = int(state.get("Pid") or 0)
        data = (info.get("GraphDriver") or {}).get("Data") or {}
        if not state.get("Running") or pid <= 0 or not data.get("UpperDir"):
            return None
        try:
            mnt_ns = Path(f"/proc/{pid}/ns/mnt").stat().st_ino
        except OSError:
            return None
        return cls(
            pid=pid,
            mnt_ns=mnt_ns,
            upper=str(data["UpperDir"]),
            lowers=[p for p in str(data.get("LowerDir") or "").split(":") if p],
            tmpfs=sorted((info.get("HostConfig") or {}).get("Tmpfs") or {}),
            volumes=sorted(m["Destination"] for m in info.get("Mounts") or [] if m.get("Type") == "volume"),
            address=inspect_address(info),
        )


def inspect_address(info: Mapping[str, Any]) -> str:
    """A container's IPv4 address on its engine network, from the engine's inspect; ''."""
    networks = (info.get("NetworkSettings") or {}).get("Networks") or {}
    return next((str(n["IPAddress"]) for n in networks.values() if isinstance(n, Mapping) and n.get("IPAddress")), "")
