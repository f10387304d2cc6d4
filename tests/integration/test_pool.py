"""The pool against the real engine: parallel acquires, refill, release-for-forensics, retention, crash reconcile."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from sandtrap.config import SandboxSettings
from sandtrap.sandbox.docker import engine
from sandtrap.sandbox.docker.backend import DockerBackend
from sandtrap.sandbox.docker.spec import LABEL_SENSOR
from sandtrap.sandbox.pool import Pool

from helpers import DATA_DIR, run


async def containers(sensor: str) -> dict[str, dict[str, object]]:
    """Every container of the sensor: name -> {running, labels}."""
    async with engine.engine() as client:
        rows = await client.containers.list(all=True, filters={"label": [f"{LABEL_SENSOR}={sensor}"]})
        return {
            r._container["Names"][0].lstrip("/"): {
                "running": r._container["State"] == "running",
                "labels": r._container["Labels"],
                "id": r.id,
            }
            for r in rows
        }


async def test_parallel_acquires_give_distinct_running_boxes_and_pool_refills(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    sensor: str,
    tmp_path: Path,
) -> None:
    pool = Pool(backend_factory(sandbox_settings(pool_size=3)), sandbox_settings(pool_size=3), tmp_path)
    await pool.start()
    assert pool.warm == 3
    boxes = await asyncio.gather(*(pool.acquire(f"sess{i:02d}", "127.0.0.1") for i in range(4)))
    assert len({b.id for b in boxes}) == 4
    # Each is really running and really separate: a file written in one is absent in the others.
    await run(boxes[0], "echo marker > /root/marker")
    codes = [(await run(b, "test -e /root/marker"))[0] for b in boxes]
    assert codes == [0, 1, 1, 1]
    await pool.wait_refilled()
    state = await containers(sensor)
    running = [n for n, c in state.items() if c["running"]]
    assert len(running) == 4 + 3, state  # four in use plus a refilled pool of three
    assert pool.warm == 3 and pool.active == 4
    for b in boxes:
        assert "-s-sess" in b.name and b.name in state
        assert state[b.name]["labels"]["sandtrap.managed"] == "true"  # type: ignore[index]
        assert state[b.name]["labels"]["sandtrap.created"]  # type: ignore[index]
    await pool.close()


async def test_release_stops_and_keeps_and_retention_removes_oldest(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    sensor: str,
    tmp_path: Path,
) -> None:
    settings = sandbox_settings(pool_size=0, retention_keep=2)
    pool = Pool(backend_factory(settings), settings, tmp_path)
    await pool.start()
    boxes = [await pool.acquire(f"r{i}", "127.0.0.2") for i in range(3)]
    await run(boxes[0], "echo evidence > /root/dropped")
    await pool.release(boxes[0])
    state = await containers(sensor)
    assert state[boxes[0].name]["running"] is False  # stopped, not removed
    # The stopped box keeps the attacker's files for forensics.
    dropped = await boxes[0].get_file("/root/dropped", 100)
    assert dropped is not None and dropped.data == b"evidence\n" and dropped.is_regular
    await pool.release(boxes[1])
    await pool.release(boxes[2])
    state = await containers(sensor)
    assert boxes[0].name not in state  # the oldest went beyond retention_keep=2
    assert {boxes[1].name, boxes[2].name} <= set(state)
    assert pool.preserved == 2
    await pool.close()


CRASHER = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from sandtrap.config import DockerSettings, SandboxSettings
    from sandtrap.sandbox.docker import seccomp
    from sandtrap.sandbox.docker.backend import DockerBackend
    from sandtrap.sandbox.pool import Pool

    async def main():
        s = SandboxSettings(docker=DockerSettings(image=sys.argv[1]), pool_size=2)
        profile = seccomp.resolve(s.docker.seccomp_profile, Path(sys.argv[4]))
        pool = Pool(DockerBackend(s.docker, s, sys.argv[2], profile), s, Path(sys.argv[3]))
        await pool.start()
        box = await pool.acquire("crashsess", "127.0.0.9")
        await pool.wait_refilled()
        print(box.name, flush=True)
        await asyncio.sleep(600)

    asyncio.run(main())
    """
)


async def test_restart_after_sigkill_reconciles_leftovers(
    backend_factory: Callable[[SandboxSettings], DockerBackend],
    sandbox_settings: Callable[..., SandboxSettings],
    built_image: str,
    sensor: str,
    tmp_path: Path,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASHER, built_image, sensor, str(tmp_path), str(DATA_DIR), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 120)
        session_box = line.decode().strip()
        assert session_box, "the crasher did not get a sandbox"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    before = await containers(sensor)
    assert sum(c["running"] for c in before.values()) == 3  # 1 in use + 2 warm, all orphaned

    settings = sandbox_settings(pool_size=1)
    pool = Pool(backend_factory(settings), settings, tmp_path)
    await pool.start()
    after = await containers(sensor)
    assert after[session_box]["running"] is False  # the session's box: stopped and kept
    stale_warm = [n for n in before if n != session_box]
    assert not any(n in after for n in stale_warm)  # stale warm boxes removed
    assert pool.preserved == 1 and pool.warm == 1
    assert sum(c["running"] for c in after.values()) == 1  # the fresh warm box
    info = next(iter(pool._preserved.values()))
    assert info.session == "crashsess" and info.src_ip == "127.0.0.9"
    await pool.close()
