"""The value types settings share: sizes (``256m``), ``host:port`` listen addresses, and the base of every section."""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)
_SIZE_FACTORS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}


def parse_size(value: Any) -> int:
    """Turn ``"256m"``, ``"1g"``, ``"512MiB"`` or an int into bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 256m, 1g or a number of bytes")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.match(value)
        if m:
            return int(float(m.group(1)) * _SIZE_FACTORS[m.group(2).lower()])
    raise ValueError("expected a size such as 256m, 1g or a number of bytes")


ByteSize = Annotated[int, BeforeValidator(parse_size)]


def split_listen(value: str) -> tuple[str, int]:
    """Split ``"host:port"`` (IPv6 as ``"[::1]:22"``) into host and port."""
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", value.strip())
    if not m:
        raise ValueError("expected 'host:port' (IPv6 as '[::1]:2222')")
    host = m.group(1) if m.group(1) is not None else m.group(3)
    port = int(m.group(2) or m.group(4))
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 0-65535")
    return host or "0.0.0.0", port


def _check_listen(value: str) -> str:
    split_listen(value)
    return value


Listen = Annotated[str, BeforeValidator(_check_listen)]


class Section(BaseModel):
    """One section of the YAML tree: an unknown key is an error (``extra="forbid"``); defaults are validated too."""

    model_config = ConfigDict(extra="forbid", validate_default=True, validate_assignment=True)


def box_subnet(value: str) -> str:
    """The boxes' subnet: a private IPv4 subnet of /29 or larger, normalised (``network.subnet``)."""
    try:
        net = ipaddress.IPv4Network(value)
    except ValueError as exc:
        raise ValueError(f"{value!r} is not an IPv4 subnet such as 10.20.1.0/24 ({exc})") from None
    if not net.is_private or net.prefixlen > 29:
        raise ValueError(f"{value!r}: use a private subnet of /29 or larger, e.g. 10.20.1.0/24")
    return str(net)
