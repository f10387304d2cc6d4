"""sandtrap from this checkout, as a real subprocess: ``.venv/bin/sandtrap -c <tmp yaml> run``.

A unique sensor name labels every container it makes; :func:`remove_sensor_containers` removes them
all afterwards. Artificial timing (auth delays and the like, from the realism work) is switched off
for the benchmark if the configuration has such a setting, and the table says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiodocker
import yaml
from pydantic import BaseModel

from bench.systems.base import HOST, BenchError, Server, check_loopback_only, free_port, stop_group, wait_port

ROOT = Path(__file__).resolve().parents[2]
SANDTRAP = ROOT / ".venv" / "bin" / "sandtrap"
LABEL_SENSOR = "sandtrap.sensor"
_TIMING = re.compile(r"delay|jitter|timing", re.IGNORECASE)


def timing_overrides() -> tuple[dict[str, Any], list[str]]:
    """Settings that add artificial delays, turned off: (nested overrides, dotted names)."""
    from sandtrap.config import Settings

    overrides: dict[str, Any] = {}
    names: list[str] = []

    def walk(model: type[BaseModel], path: list[str]) -> None:
        for key, info in model.model_fields.items():
            ann = info.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                walk(ann, [*path, key])
                continue
            if not _TIMING.search(key):
                continue
            off: Any = False if ann is bool else 0
            node = overrides
            for part in path:
                node = node.setdefault(part, {})
            node[key] = off
            names.append(".".join([*path, key]))

    walk(Settings, [])
    return overrides, names


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


@dataclass
class SandtrapServer(Server):
    sensor: str = ""
    pool_size: int = 0
    data_dir: Path = field(default_factory=Path)
    docker: aiodocker.Docker | None = None
    _log_offset: int = 0
    _connects: int = 0
    _closed: int = 0
    _log_grew_at: float = 0.0

    async def _running(self) -> list[dict[str, Any]]:
        assert self.docker is not None
        filters = {"label": [f"{LABEL_SENSOR}={self.sensor}"], "status": ["running"]}
        rows = await self.docker.containers.list(filters=filters)
        return [r._container for r in rows]

    async def settle(self, timeout_s: float = 30.0, active: int = 0) -> bool:
        """Every ended connection's closing record written (its box's changes collected) and the pool
        refilled to ``pool_size`` warm boxes. Stopping the released box (mostly waiting) may go on.

        A connection whose closing record never comes (a bug) would hold this up: after its event log
        has been quiet for 2 s it counts as settled, and the report lists the missing records."""
        prefix = f"/sandtrap-{self.sensor}-w-"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self._scan_log()
            quiet = time.monotonic() - self._log_grew_at >= 2.0
            if self._connects - self._closed <= active or quiet:
                names = [(c.get("Names") or [""])[0] for c in await self._running()]
                if sum(1 for n in names if n.startswith(prefix)) >= self.pool_size:
                    return True
            await asyncio.sleep(0.05)
        return False

    def health(self) -> dict[str, Any]:
        """Connections without a closing record, and errors in sandtrap's diagnostics log."""
        self._scan_log()
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            text = ""
        errors = [line for line in text.splitlines() if " ERROR " in line or "Traceback" in line]
        return {
            "connections": self._connects,
            "closing_records": self._closed,
            "error_lines": len(errors),
            "first_errors": errors[:3],
        }

    def _scan_log(self) -> None:
        """Count connect and closed events in the JSON log, reading only what was added."""
        path = self.data_dir / "log" / "sandtrap.json"
        try:
            with path.open("rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return
        end = data.rfind(b"\n") + 1
        if end:
            self._log_grew_at = time.monotonic()
        self._log_offset += end
        for line in data[:end].splitlines():
            if b"cowrie.session.connect" in line:
                self._connects += 1
            elif b"cowrie.session.closed" in line:
                self._closed += 1

    async def session_memory_bytes(self) -> int | None:
        """Memory charged to the session boxes' cgroups (cgroup v1 or v2), summed."""
        return await asyncio.to_thread(self._session_memory_bytes, await self._running())

    @staticmethod
    def _session_memory_bytes(running: list[dict[str, Any]]) -> int | None:
        total, found = 0, False
        for c in running:
            name = (c.get("Names") or [""])[0]
            if "-s-" not in name:
                continue
            cid = c["Id"]
            for path in (
                Path(f"/sys/fs/cgroup/memory/docker/{cid}/memory.usage_in_bytes"),
                # limits_in_parent: below the box's parent cgroup (includes its session scopes)
                *Path("/sys/fs/cgroup/memory").glob(f"sandtrap-*/*/{cid}/memory.usage_in_bytes"),
                Path(f"/sys/fs/cgroup/system.slice/docker-{cid}.scope/memory.current"),
                Path(f"/sys/fs/cgroup/docker/{cid}/memory.current"),
            ):
                with contextlib.suppress(OSError, ValueError):
                    total += int(path.read_text().strip())
                    found = True
                    break
        return total if found else None

    def events(self, eventid: str | None = None) -> list[dict[str, Any]]:
        path = self.data_dir / "log" / "sandtrap.json"
        out = []
        with contextlib.suppress(OSError):
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if eventid is None or event.get("eventid") == eventid:
                        out.append(event)
        return out

    async def stop(self) -> None:
        await stop_group(self.process, grace_s=120.0)
        if self.docker is not None:
            await self.docker.close()
            self.docker = None


async def remove_sensor_containers(sensor: str) -> int:
    """Remove every container labelled with this sensor (the pool's, the floor's, the cold-creation ones)."""
    async with aiodocker.Docker() as docker:
        rows = await docker.containers.list(all=True, filters={"label": [f"{LABEL_SENSOR}={sensor}"]})
        sem = asyncio.Semaphore(8)

        async def rm(c: Any) -> None:
            async with sem:
                with contextlib.suppress(aiodocker.DockerError):
                    await c.delete(force=True, v=True)

        await asyncio.gather(*(rm(c) for c in rows))
        return len(rows)


async def start(
    work: Path,
    password: str,
    pool_size: int,
    max_sandboxes: int,
    wrap: list[str] | None = None,
    extra: dict[str, Any] | None = None,
) -> SandtrapServer:
    """Start sandtrap; ``wrap`` runs it under a profiler (``[python, -m, pyinstrument, ...]``); ``extra``
    is merged into its config (for experiments: ``{"sandbox": {"honeytokens": False}}``)."""
    from sandtrap.config import Settings
    from sandtrap.sandbox.docker import seccomp

    sensor = f"bench-{secrets.token_hex(4)}"
    data_dir = work / "sandtrap-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "sensor": sensor,
        "ssh": {"listen": f"{HOST}:{port}"},
        "api": {"listen": f"{HOST}:{free_port()}"},
        # Login as root, the name attackers use; only the benchmark's password gets in, so a flood fails.
        "auth": {"credentials": [{"username": "root", "password": password}], "accept_all_after": 0},
        # The profile `make setup` installed (or the checkout's data dir's own); this run has a data dir of its own.
        "sandbox": {
            "pool_size": pool_size,
            "max_sandboxes": max_sandboxes,
            # Every bench login comes from 127.0.0.1: with the default affinity (source_ip) they would share one box;
            # a box per connection is what the per-session figures (latency, memory per session) measure.
            "affinity": "session",
            "docker": {"seccomp_profile": str(seccomp.find(ROOT / Settings().storage.data_dir))},
        },
        "limits": {"max_sessions": max_sandboxes + 100, "max_sessions_per_ip": max_sandboxes + 100},
        "storage": {"data_dir": str(data_dir)},
    }
    overrides, turned_off = timing_overrides()
    config = merge(merge(config, overrides), extra or {})
    cfg = work / "sandtrap.yaml"
    cfg.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    log = work / "sandtrap.log"
    version = "sandtrap " + await asyncio.to_thread(_checkout_version)
    argv = [*wrap, "-m", "sandtrap.cli"] if wrap else [str(SANDTRAP)]
    argv += ["-c", str(cfg), "run"]
    with log.open("wb") as f:
        process = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=f, stderr=f, start_new_session=True, cwd=str(work)
        )
    server = SandtrapServer(
        name="sandtrap",
        label="sandtrap",
        version=version,
        port=port,
        username="root",
        password=password,
        process=process,
        log=log,
        sensor=sensor,
        pool_size=pool_size,
        data_dir=data_dir,
        docker=aiodocker.Docker(),
    )
    if turned_off:
        server.notes.append("artificial timing turned off: " + ", ".join(turned_off))
    else:
        server.notes.append("no artificial auth/response delay setting exists in this version (nothing to turn off)")
    try:
        await wait_port(port, process, 300.0, log)  # the pool is warm before the listener opens
        server.listening = check_loopback_only("sandtrap", process.pid)
    except BaseException:
        await server.stop()
        raise
    return server


def _checkout_version() -> str:
    import os
    import subprocess

    rev = os.environ.get("BENCH_SANDTRAP_REV")
    if rev:
        return f"{rev} (committed revision, exported)"
    out = subprocess.run(
        ["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True, text=True, check=False
    )
    return (out.stdout.strip() or "unknown") + " (this checkout)"


def require_installed() -> None:
    if not SANDTRAP.exists():
        raise BenchError(f"{SANDTRAP} missing: run `make setup` first")
