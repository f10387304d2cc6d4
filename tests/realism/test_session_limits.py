"""A login's open-files limits are the box's (PID 1's, from the engine's spec), as systemd's
DefaultLimitNOFILE gives every sshd session, whatever limits the engine's exec arrived with (it sometimes
starts a process with its soft limit raised to the hard one)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from sshclient import asyncssh_connected

pytestmark = pytest.mark.timeout(120)


async def test_every_channel_gets_the_box_open_files_limits(honeypot: Callable[..., Any]) -> None:
    hp = await honeypot()
    async with asyncssh_connected(hp) as conn:
        box = await conn.run("grep 'Max open files' /proc/1/limits", check=True)
        pid1_soft, hard = str(box.stdout).split()[3:5]
        soft = str(hp.settings.sandbox.docker.ulimit_nofile)
        if hp.settings.sandbox.init != "systemd":  # systemd raises its own soft limit, as on a real server
            assert pid1_soft == soft
        for _ in range(8):
            r = await conn.run("ulimit -Sn; ulimit -Hn", check=True)
            assert str(r.stdout).split() == [soft, hard]
        r = await conn.run("bash -lc 'ulimit -Sn'", check=True)
        assert str(r.stdout).strip() == soft
