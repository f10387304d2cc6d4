"""A login sits where pam_systemd puts it: ``user.slice/user-<uid>.slice/session-<n>.scope`` below the box's
cgroup, in every hierarchy, with ``n`` the login's ``XDG_SESSION_ID``; the box's limits, on its parent cgroup,
still bind the session; and when the box goes, nothing of its cgroups stays on the host.

Needs the honeypot on the engine's host as root with cgroup v1 and the cgroupfs driver (what
``sandbox.docker.limits_in_parent`` needs); skipped elsewhere.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sandtrap.events import SANDBOX_ASSIGNED
from sandtrap.sandbox.docker import engine

from helpers import limit_files
from sshclient import asyncssh_connected

pytestmark = pytest.mark.timeout(180)


async def test_a_login_is_in_its_session_scope_and_still_bound_by_the_box_limits(honeypot: Callable[..., Any]) -> None:
    hp = await honeypot()
    backend = hp.services.backend
    await backend.ping()
    async with asyncssh_connected(hp) as conn:
        r = await conn.run(
            "sleep 1; echo $XDG_SESSION_ID; cat /proc/self/cgroup; cat /sys/fs/cgroup/pids/pids.max", check=True
        )
        if backend.parents is None:
            pytest.skip("limits_in_parent is not possible on this host (see the honeypot's log)")
        out = str(r.stdout).splitlines()
        session_id, rows, root_max = out[0], out[1:-1], out[-1]
        scope = f"/user.slice/user-0.slice/session-{session_id}.scope"
        paths = {ctrls: path for _, ctrls, path in (row.split(":", 2) for row in rows)}
        # As systemd has a login on cgroup v1: the scope in its own hierarchy, pids and the unified one;
        # user.slice in the accounting controllers; the root in the others.
        assert paths["name=systemd"] == paths["pids"] == scope, rows
        assert paths.get("", scope) == scope, rows  # the unified hierarchy, where mounted
        assert paths["memory"] == paths["devices"] == "/user.slice", rows
        assert paths["cpuset"] == paths["freezer"] == "/", rows
        assert root_max == "max"  # the box's own root: unlimited, as on a real machine

        box = (await hp.wait_for(SANDBOX_ASSIGNED))[0].get("sandbox_id")
        assert int((await limit_files(box, "pids", "pids.max"))["pids.max"]) == hp.settings.sandbox.pids_limit
        r = await conn.run("cat /sys/fs/cgroup/pids/user.slice/user-0.slice/pids.max", check=True)
        assert str(r.stdout).strip() == "max"
        # A second channel of the same connection joins the same scope (one login, one scope).
        r = await conn.run("grep -m1 pids /proc/self/cgroup", check=True)
        assert re.fullmatch(rf"\d+:pids:{re.escape(scope)}\n", str(r.stdout)), r.stdout

        async with engine.engine() as client:
            parent = (await client.containers.container(box).show())["HostConfig"]["CgroupParent"]
        assert parent.startswith(f"/{backend.parents.prefix}/")

    # The session is over: the box is stopped (kept for forensics) and its cgroups, scopes included, go.
    hierarchies = [h for h in Path("/sys/fs/cgroup").iterdir() if h.is_dir() and not h.is_symlink()]
    async with asyncio.timeout(60):
        while any((h / parent.lstrip("/")).exists() for h in hierarchies):
            await backend.list_managed()  # sweeps what a busy stop left
            await asyncio.sleep(0.5)
