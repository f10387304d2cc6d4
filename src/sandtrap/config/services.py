"""The listeners (``services``; TOML ``[[service]]``): which protocols the sensor serves, where, into which port
of the attacker's box, and what each records and allows.

SSH is one service. With no ``services`` the sensor serves today's single SSH listener at ``ssh.listen``.
With ``services``, the list is every listener; an ``ssh`` service's ``listen`` *is* ``ssh.listen`` (mapped onto
it, so ``sandtrap config show`` shows one value); writing both, different, is an error naming both keys. The
other ``ssh`` keys (version, host keys, ...) configure that listener.

The Architecture seed's example config (``[global]`` then ``[[service]]`` tables) is read through
:func:`map_seed_keys`: its ``[global]`` keys land where this tree keeps them, anything else is an error that says
where the key lives here.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from sandtrap.config.values import ByteSize, Listen, Section, split_listen

Protocol = Literal["ssh", "telnet", "tcp", "udp"]
RAW_PROTOCOLS = ("tcp", "udp")
_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")

# The seed's [global] keys, and where this tree keeps each.
SEED_GLOBAL_KEYS: dict[str, tuple[str, ...]] = {
    "sensor": ("sensor",),
    "sensor_name": ("sensor",),
    "log_level": ("log_level",),
    "data_dir": ("storage", "data_dir"),
    "database_url": ("storage", "database_url"),
    "max_sessions": ("limits", "max_sessions"),
    "max_sessions_per_ip": ("limits", "max_sessions_per_ip"),
    "idle_timeout_seconds": ("limits", "idle_timeout_s"),
    "image": ("sandbox", "docker", "image"),
    "backend": ("sandbox", "backend"),
}


class CaptureSettings(Section):
    """What a service records. ``metadata``: its events (connect, login, commands, bytes, close) - always written
    for ssh and telnet, whose events are the session; for a raw service ``false`` keeps only connect and close."""

    pty: bool = Field(True, description="ssh/telnet: a cast (asciicast v2) of each terminal, with its resizes")
    pcap: bool = Field(False, description="tcp/udp: a pcap of each connection's payload (addresses as seen)")
    metadata: bool = Field(True, description="events; tcp/udp: also a JSON-lines stream of the bytes, with timing")


class ServiceSessionSettings(Section):
    """Per-service bounds on one connection; unset = the ``limits`` section's."""

    timeout_seconds: float | None = Field(None, gt=0, description="a connection ends after this long")
    max_bytes: ByteSize | None = Field(None, description="bytes both ways; past it the connection ends")
    idle_timeout_seconds: float | None = Field(None, gt=0, description="udp: a peer silent this long is forgotten")


class ServiceSettings(Section):
    name: str
    protocol: Protocol
    listen: Listen | None = Field(None, description="host:port; or give `port` (listens on 0.0.0.0)")
    port: int | None = Field(None, ge=0, le=65535, description="shorthand for listen = 0.0.0.0:<port>")
    target_port: int | None = Field(None, ge=1, le=65535, description="tcp/udp: the port in the attacker's box")
    capture: CaptureSettings = CaptureSettings()
    session: ServiceSessionSettings = ServiceSessionSettings()
    persona: str = Field(
        "", description="logins on this service land in this persona's box (personas[].name); '' = chosen by weight"
    )
    # A service's own image: a persona with its own image is the way (personas[].extra_packages or image). Refused
    # when set (never silently ignored).
    image: str = Field("", description="not available: give the service a persona with its own image instead")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.fullmatch(v):
            raise ValueError("must be 1-32 of a-z, 0-9, '_' and '-', starting with a letter or digit (e.g. http)")
        return v

    @field_validator("persona")
    @classmethod
    def _persona(cls, v: str) -> str:
        if v and not _NAME.fullmatch(v):
            raise ValueError("must be a persona's name (personas[].name), e.g. db")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str) -> str:
        if v:
            raise ValueError(
                "a service has no image of its own: give it a persona (services[].persona) whose image is the one "
                "you want (personas[].image or personas[].extra_packages). Fix: remove this key"
            )
        return v

    @model_validator(mode="after")
    def _check(self) -> ServiceSettings:
        if (self.listen is None) == (self.port is None):
            raise ValueError(f"service {self.name}: give exactly one of `listen` (host:port) or `port`")
        if self.protocol in RAW_PROTOCOLS and self.target_port is None:
            raise ValueError(f"service {self.name}: a {self.protocol} service needs target_port (the port in the box)")
        if self.protocol not in RAW_PROTOCOLS and self.target_port is not None:
            raise ValueError(f"service {self.name}: target_port is for tcp/udp services; {self.protocol} logs in")
        return self

    @property
    def address(self) -> str:
        """Where it listens, as ``host:port``."""
        return self.listen if self.listen is not None else f"0.0.0.0:{self.port}"

    @property
    def is_raw(self) -> bool:
        return self.protocol in RAW_PROTOCOLS


def check_services(services: list[ServiceSettings]) -> None:
    """Names unique, one SSH service, no two services on one address and transport (port 0 excepted)."""
    names: set[str] = set()
    bound: dict[tuple[str, int, str], str] = {}
    ssh = 0
    for i, s in enumerate(services):
        if s.name in names:
            raise ValueError(f"services[{i}]: a second service named {s.name!r}; names must be unique")
        names.add(s.name)
        ssh += s.protocol == "ssh"
        if ssh > 1:
            raise ValueError(f"services[{i}]: a second ssh service; the sensor has one SSH listener (ssh.listen)")
        host, port = split_listen(s.address)
        transport = "udp" if s.protocol == "udp" else "tcp"
        key = (host, port, transport)
        if port and key in bound:
            raise ValueError(f"services[{i}]: {s.name} and {bound[key]} both listen on {transport} {s.address}")
        bound[key] = s.name


def _normalise_protocol(data: dict[str, Any], i: int) -> None:
    proto = data.get("protocol")
    if isinstance(proto, str) and proto.lower() in ("http", "https", "smtp", "ftp", "redis", "mysql"):
        raise ValueError(
            f'services[{i}].protocol: {proto!r} is served by the box itself: write protocol = "tcp" and '
            f"target_port = the port its server listens on in the box (80 for the image's nginx)"
        )


def map_seed_keys(data: dict[str, Any]) -> dict[str, Any]:
    """The seed's spelling onto this tree: ``service`` (TOML's ``[[service]]``) is ``services``; ``[global]``'s keys
    go where :data:`SEED_GLOBAL_KEYS` says. Raises ValueError naming the key for anything it cannot place."""
    out = dict(data)
    if "service" in out:
        if "services" in out:
            raise ValueError("service and services: both list the listeners; keep one ([[service]] in TOML)")
        out["services"] = out.pop("service")
    if isinstance(out.get("services"), list):
        for i, s in enumerate(out["services"]):
            if isinstance(s, dict):
                _normalise_protocol(s, i)
    seed = out.pop("global", None)
    if seed is None:
        return out
    if not isinstance(seed, dict):
        raise ValueError("global: must be a table of settings ([global])")
    for key, value in seed.items():
        where = SEED_GLOBAL_KEYS.get(key)
        if where is None:
            known = ", ".join(sorted(SEED_GLOBAL_KEYS))
            raise ValueError(f"global.{key}: unknown key; [global] takes {known} (the rest has its own section)")
        if key == "log_level" and isinstance(value, str):
            value = value.upper()
        node = out
        for part in where[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ValueError(f"global.{key}: {'.'.join(where[:-1])} is not a section")
            else:
                child = node[part] = dict(child)
            node = child
        if where[-1] in node and node[where[-1]] != value:
            raise ValueError(f"global.{key} and {'.'.join(where)}: the same setting twice, different; keep one")
        node[where[-1]] = value
    return out
