"""The sandbox image on the real engine: built once, current, a no-op to rebuild, and convincing inside."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import aiodocker
import pytest
from aiodocker.containers import DockerContainer
from rich.console import Console

from sandtrap.config import ImageSettings, Settings
from sandtrap.errors import ImageError
from sandtrap.sandbox.docker.engine import engine
from sandtrap.sandbox.docker.image import build_image, check_image

pytestmark = pytest.mark.timeout(300)

CACHE_DIR = Path(__file__).resolve().parents[2] / Settings().storage.data_dir / "cache"
CAPS = ["CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "AUDIT_WRITE"]


def quiet() -> Console:
    return Console(stderr=True, quiet=True)


@pytest.fixture
async def docker() -> AsyncIterator[aiodocker.Docker]:
    async with engine() as client:
        yield client


@pytest.fixture
async def container(docker: aiodocker.Docker, built_image: str) -> AsyncIterator[DockerContainer]:
    """A running sandbox-like container from the image: no network, few capabilities."""
    box = await docker.containers.create(
        {
            "Image": built_image,
            "Hostname": "web-prod-03",
            "Labels": {"sandtrap.test": "1"},
            "HostConfig": {"NetworkMode": "none", "CapDrop": ["ALL"], "CapAdd": CAPS, "Init": False},
        }
    )
    try:
        await box.start()
        yield box
    finally:
        await box.delete(force=True, v=True)


async def sh(box: DockerContainer, script: str) -> tuple[int, str]:
    """Run ``sh -c script`` as root; return exit code and merged output."""
    exe = await box.exec(["sh", "-c", script], user="root")
    out = bytearray()
    async with exe.start(detach=False) as stream:
        while (msg := await stream.read_out()) is not None:
            out.extend(msg.data)
    code = (await exe.inspect())["ExitCode"]
    return int(code), out.decode(errors="replace")


async def test_the_built_image_is_current_and_a_rebuild_is_a_no_op(built_image: str) -> None:
    settings = Settings()
    check = await check_image(settings.image, built_image)
    assert check.present and check.current
    assert check.actual == check.expected

    started = time.monotonic()
    again = await build_image(settings.image, built_image, CACHE_DIR, console=quiet())
    assert again.built is False
    assert again.inputs == check.expected
    assert time.monotonic() - started < 10


async def test_check_image_reports_a_missing_tag() -> None:
    check = await check_image(ImageSettings(), "sandtrap-target:no-such-tag")
    assert (check.present, check.current, check.actual) == (False, False, None)


async def test_a_base_image_that_is_not_local_is_named(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="no-such-base:1"):
        await build_image(ImageSettings(), "sandtrap-target:never", tmp_path, base="no-such-base:1", console=quiet())


async def test_the_image_has_the_tools_an_attacker_expects(container: DockerContainer) -> None:
    tools = "bash ls cat ps ip less vi curl wget nc python3 ssh file sudo"
    code, out = await sh(container, f"for t in {tools}; do command -v $t >/dev/null || echo missing $t; done")
    assert (code, out) == (0, "")
    code, _ = await sh(container, "test -x /usr/lib/openssh/sftp-server")
    assert code == 0


async def test_users_have_homes_shells_passwords_and_history(container: DockerContainer) -> None:
    for user, home in (("root", "/root"), ("admin", "/home/admin")):
        code, out = await sh(container, f"getent passwd {user}")
        assert code == 0
        fields = out.strip().split(":")
        assert (fields[5], fields[6]) == (home, "/bin/bash")
        code, out = await sh(
            container, f"test -s {home}/.bash_history && test -f {home}/.bashrc && getent shadow {user}"
        )
        assert code == 0
        assert out.split(":")[1].startswith("$"), f"{user} has no password hash"
    code, out = await sh(container, "id -nG admin; id -u admin")
    assert code == 0 and "sudo" in out.split() and out.split()[-1] == "1000"


async def test_lure_files_motd_and_timezone_are_in_place(container: DockerContainer) -> None:
    code, out = await sh(container, "cat /var/www/inventory/config/settings.ini /var/www/inventory/.env")
    assert code == 0
    assert "db01.corp.internal" in out and "password" in out and "INTERNAL_API_TOKEN=" in out
    code, out = await sh(
        container, "wc -l < /var/log/nginx/access.log; grep -c /api/v1/internal/ /var/log/nginx/access.log"
    )
    lines, internal = map(int, out.split())
    assert code == 0 and lines >= 200 and internal > 0
    code, out = await sh(container, "cat /etc/motd /etc/issue.net /etc/timezone")
    assert code == 0
    assert "The programs included with the Debian GNU/Linux system are free software" in out
    assert "Debian GNU/Linux 12" in out and "Etc/UTC" in out
    code, out = await sh(container, "grep -h db-backup /etc/cron.d/*; test -x /usr/local/bin/db-backup.sh")
    assert code == 0 and "/usr/local/bin/db-backup.sh" in out
    # History and lure files look weeks old, not built today.
    code, out = await sh(container, "echo $(( $(date +%s) - $(stat -c %Y /var/www/inventory/config/settings.ini) ))")
    assert code == 0 and int(out) > 14 * 86400


async def test_init_is_pid_1_and_keeps_daemons(container: DockerContainer) -> None:
    code, out = await sh(container, "cat /proc/1/comm")
    assert (code, out.strip()) == (0, "init")
    for _ in range(50):
        _, out = await sh(container, "ps -eo ppid=,comm=")
        daemons = {comm for ppid, comm in (line.split() for line in out.splitlines()) if ppid == "1"}
        if {"cron", "rsyslogd"} <= daemons:
            break
        await asyncio.sleep(0.1)
    assert {"cron", "rsyslogd"} <= daemons
    code, out = await sh(container, "logger -p auth.notice probe-line; sleep 0.5; tail -n 1 /var/log/auth.log")
    assert code == 0 and "probe-line" in out


async def test_init_stops_everything_on_sigterm(docker: aiodocker.Docker, container: DockerContainer) -> None:
    started = time.monotonic()
    await container.stop(t=10)
    assert time.monotonic() - started < 5
    state = (await docker.containers.get(container.id))["State"]
    assert state["ExitCode"] == 0


async def test_nothing_in_the_image_gives_the_trap_away(
    docker: aiodocker.Docker, container: DockerContainer, built_image: str
) -> None:
    code, out = await sh(
        container,
        "cd / && grep -rliaD skip -e sandtrap -e honeypot $(ls / | grep -vx -e proc -e sys -e dev) 2>/dev/null",
    )
    assert out == "", f"files naming the trap: {out}"
    code, out = await sh(container, "getent passwd; getent group")
    assert code == 0 and "sandtrap" not in out.lower()
    history = cast(list[dict[str, Any]], await docker.images.history(built_image))  # typed as a dict upstream
    for entry in history:
        text = f"{entry.get('CreatedBy', '')} {entry.get('Comment', '')}".lower()
        assert "sandtrap" not in text and "honeypot" not in text
