"""The lure tree's pure parts: the tree the lure file system serves (loaded from a host directory, bounded),
the plausible files it holds by default, the rate bound on its events, and the wire between the daemon
(``lurefs.py``) and the honeypot (``virtiofs.py``).

The wire is one ``AF_UNIX``/``SOCK_DGRAM`` socket pair, one JSON object per datagram:

- daemon -> honeypot: ``{"op": "open"|"opendir"|"read", "path": "/a/b", "bytes": n, "offset": o}`` (``path``
  inside the lure tree), and ``{"op": "suppressed", "count": n}`` for events the rate bound dropped;
- honeypot -> daemon: ``{"op": "add", "path": "/.x/name", "data": "<base64>", "mode": 384, "mtime": 1.7e9}``
  (a honeytoken served from a directory the root's listing does not show).
"""

from __future__ import annotations

import base64
import json
import os
import random
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FSNAME = "sandtrap-lure"
FSTYPE = "fuse." + FSNAME  # its mounts' type in /proc/self/mountinfo
MAX_DATAGRAM = 64 * 1024
MAX_NAME = 255
MAX_ENTRIES = 10_000


@dataclass
class Node:
    data: bytes = b""
    mode: int = stat.S_IFDIR | 0o755
    mtime_ns: int = 0
    children: dict[str, Node] = field(default_factory=dict)
    hidden: bool = False  # not in its parent's listing (a honeytoken's directory); found by name only

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)


class LureTree:
    """An in-memory tree of directories and regular files, at most ``max_bytes`` of file data."""

    def __init__(self, max_bytes: int, mtime: float | None = None) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.entries = 1
        self.root = Node(mtime_ns=int((time.time() if mtime is None else mtime) * 1e9))

    def lookup(self, path: str) -> Node | None:
        node = self.root
        for name in _parts(path):
            child = node.children.get(name)
            if child is None:
                return None
            node = child
        return node

    def listing(self, path: str) -> list[str] | None:
        node = self.lookup(path)
        if node is None or not node.is_dir:
            return None
        return [name for name, child in node.children.items() if not child.hidden]

    def add(self, path: str, data: bytes, mode: int, mtime: float, hidden_dir: bool = False) -> None:
        """A regular file at ``path`` (its directories made); ValueError past the bounds or over a directory."""
        parts = _parts(path)
        if not parts or any(not name or len(name.encode()) > MAX_NAME or name in (".", "..") for name in parts):
            raise ValueError(f"not a file path: {path!r}")
        old = self.lookup(path)
        grow = len(data) - (len(old.data) if old is not None else 0)
        if self.bytes + grow > self.max_bytes or self.entries + len(parts) > MAX_ENTRIES:
            raise ValueError(f"the lure tree would exceed {self.max_bytes} bytes or {MAX_ENTRIES} entries")
        node = self.root
        mtime_ns = int(mtime * 1e9)
        for i, name in enumerate(parts[:-1]):
            child = node.children.get(name)
            if child is None:
                child = node.children[name] = Node(mtime_ns=mtime_ns, hidden=hidden_dir and i == 0)
                self.entries += 1
            if not child.is_dir:
                raise ValueError(f"{path!r}: {name} is a file")
            node = child
        if old is not None and old.is_dir:
            raise ValueError(f"{path!r} is a directory")
        if old is None:
            self.entries += 1
        node.children[parts[-1]] = Node(data, stat.S_IFREG | (mode & 0o777), mtime_ns)
        self.bytes += grow

    @classmethod
    def load(cls, source: Path, max_bytes: int) -> LureTree:
        """Every directory and regular file under ``source`` (symlinks and special files skipped)."""
        tree = cls(max_bytes, source.stat().st_mtime)
        for path, st in _walk(source, source):
            rel = "/" + path.relative_to(source).as_posix()
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb", opener=_nofollow) as f:
                    data = f.read(max_bytes - tree.bytes + 1)
                tree.add(rel, data, st.st_mode, st.st_mtime)
        return tree


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW)


def _walk(top: Path, source: Path) -> Iterator[tuple[Path, os.stat_result]]:
    with os.scandir(top) as it:
        for entry in sorted(it, key=lambda e: e.name):
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                yield from _walk(Path(entry.path), source)
            elif stat.S_ISREG(st.st_mode):
                yield Path(entry.path), st


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


class RateLimit:
    """A token bucket: ``rate`` events a second on average, ``burst`` at once; what it refuses is counted."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.last = now
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count


def encode(message: dict[str, Any]) -> bytes:
    data = json.dumps(message, separators=(",", ":"), ensure_ascii=True).encode()
    if len(data) > MAX_DATAGRAM:
        raise ValueError("message too long")
    return data


def decode_event(data: bytes) -> dict[str, Any] | None:
    """A daemon's event, checked field by field (the daemon serves a hostile guest: trust nothing blindly)."""
    try:
        msg = json.loads(data)
    except ValueError:
        return None
    if not isinstance(msg, dict):
        return None
    op = msg.get("op")
    if op == "suppressed":
        count = msg.get("count")
        return {"op": op, "count": count} if isinstance(count, int) and count >= 0 else None
    path, size, offset = msg.get("path"), msg.get("bytes", 0), msg.get("offset", 0)
    if op not in ("open", "opendir", "read") or not isinstance(path, str) or not path.startswith("/"):
        return None
    if not (isinstance(size, int) and isinstance(offset, int) and size >= 0 and offset >= 0):
        return None
    return {"op": op, "path": path[:4096], "bytes": size, "offset": offset}


def add_message(path: str, data: bytes, mode: int, mtime: float) -> bytes:
    return encode({"op": "add", "path": path, "data": base64.b64encode(data).decode(), "mode": mode, "mtime": mtime})


def decode_add(data: bytes) -> tuple[str, bytes, int, float] | None:
    try:
        msg = json.loads(data)
        if msg.get("op") != "add":
            return None
        return str(msg["path"]), base64.b64decode(msg["data"], validate=True), int(msg["mode"]), float(msg["mtime"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


# --- The default tree: plausible files of a small company's file share, different in every VM ---------

_FIRST = ["Anna", "Ben", "Clara", "David", "Eva", "Felix", "Greta", "Hannes", "Ida", "Jonas", "Lena", "Moritz",
          "Nina", "Oskar", "Paula", "Rafael", "Sofia", "Tobias", "Ulla", "Vincent"]  # fmt: skip
_LAST = ["Becker", "Fischer", "Hoffmann", "Koch", "Klein", "Lange", "Meyer", "Neumann", "Richter", "Schmidt",
         "Schulz", "Wagner", "Weber", "Wolf", "Zimmermann"]  # fmt: skip
_COMPANIES = ["Nordwind Logistik GmbH", "Alpenblick Pharma AG", "Kessler Maschinenbau", "Rheinhafen Energie",
              "Brightline Retail Ltd", "Havel Medical Systems", "Ostsee Shipping KG", "Vela Insurance SE"]  # fmt: skip


def default_files(rng: random.Random, now: float) -> dict[str, tuple[bytes, int, float]]:
    """The lure tree when ``sandbox.microvm.lure.source`` is empty: relative path -> (data, mode, mtime)."""

    def age(days: int) -> float:
        return now - rng.randint(days, days * 3) * 86400 - rng.randint(0, 86399)

    people = [(rng.choice(_FIRST), rng.choice(_LAST)) for _ in range(rng.randint(40, 70))]
    rows = ["customer_id,company,contact,email,annual_contract_eur,renewal"]
    for i, company in enumerate(rng.sample(_COMPANIES, len(_COMPANIES))):
        first, last = rng.choice(people)
        rows.append(
            f"C-{10421 + i * 7},{company},{first} {last},{first[0].lower()}.{last.lower()}@"
            f"{company.split()[0].lower()}.example,{rng.randint(40, 900) * 1000},2027-0{rng.randint(1, 9)}-01"
        )
    salaries = ["employee_id,name,department,salary_eur,bonus_pct"]
    for i, (first, last) in enumerate(people):
        dept = rng.choice(["Engineering", "Sales", "Finance", "Operations", "Support"])
        salaries.append(f"E{2000 + i},{first} {last},{dept},{rng.randint(42, 128) * 1000},{rng.randint(0, 20)}")
    forecast = ["quarter,revenue_eur,ebitda_eur,headcount"]
    revenue = rng.randint(8, 14) * 1_000_000
    for q in range(1, 5):
        revenue = int(revenue * rng.uniform(1.01, 1.09))
        forecast.append(f"2026-Q{q},{revenue},{int(revenue * rng.uniform(0.08, 0.19))},{len(people) + q * 3}")
    dump = ["-- PostgreSQL database dump", "-- Dumped from database version 15.8", "SET client_encoding = 'UTF8';",
            "COPY public.accounts (id, login, password_hash) FROM stdin;"]  # fmt: skip
    for i, (first, last) in enumerate(people[:25]):
        dump.append(f"{i + 1}\t{first[0].lower()}{last.lower()}\t$2b$12${rng.randbytes(22).hex()[:53]}")
    dump.append("\\.")
    contract = (
        f"MUTUAL NON-DISCLOSURE AGREEMENT\n\nbetween {rng.choice(_COMPANIES)} and {rng.choice(_COMPANIES)}\n\n"
        "1. Confidential Information means all technical and commercial information disclosed ...\n"
        f"Signed: {' '.join(rng.choice(people))}, Managing Director\n"
    )
    readme = (
        "Proprietary data share - INTERNAL ONLY\n\nMirrored nightly from fs02. Do not copy outside the company.\n"
        "Questions: it-ops@corp.internal\n"
    )
    dumped = age(2)
    dump_text = "\n".join(dump).encode() + b"\n"
    return {
        "README.txt": (readme.encode(), 0o644, age(200)),
        "customers/customers_2026.csv": ("\n".join(rows).encode() + b"\n", 0o640, age(10)),
        "finance/forecast_2026.csv": ("\n".join(forecast).encode() + b"\n", 0o640, age(30)),
        "hr/salaries_2026.csv": ("\n".join(salaries).encode() + b"\n", 0o600, age(40)),
        "legal/nda_signed.txt": (contract.encode(), 0o644, age(90)),
        f"backups/accounts_{time.strftime('%Y-%m-%d', time.gmtime(dumped))}.sql": (dump_text, 0o600, dumped),
    }


def write_tree(target: Path, files: dict[str, tuple[bytes, int, float]]) -> None:
    for rel, (data, mode, mtime) in files.items():
        path = target / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        path.chmod(mode)
        os.utime(path, (mtime, mtime))
