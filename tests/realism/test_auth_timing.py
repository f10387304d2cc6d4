"""Auth timing like sshd with PAM: a failure takes ~2 s, a login ~0.1 s, and waiting burns no CPU."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncssh
import pytest

pytestmark = pytest.mark.timing  # failures take ~2 s and logins ~0.1 s: measured, so run alone (make test)


async def attempt(port: int, password: str) -> tuple[bool, float]:
    start = time.monotonic()
    try:
        conn = await asyncssh.connect(
            "127.0.0.1",
            port,
            username="root",
            password=password,
            known_hosts=None,
            client_keys=None,
            preferred_auth="password",
        )
    except asyncssh.PermissionDenied:
        return False, time.monotonic() - start
    conn.close()
    return True, time.monotonic() - start


async def test_failure_is_delayed_like_pam_and_costs_no_cpu(honeypot: Callable[..., Any]) -> None:
    hp = await honeypot(auth={"failure_delay_s": 2.0, "success_delay_s": 0.08})
    # Baseline: a login (handshake + the ~0.08 s success delay), the quicker of two (the first connection to a
    # fresh honeypot is the slower one, which would make the failure's own delay look shorter than it was).
    logins = [await attempt(hp.port, "hunter2") for _ in range(2)]
    assert all(ok for ok, _ in logins)
    login_s = min(s for _, s in logins)
    cpu_before = time.process_time()
    ok, fail_s = await attempt(hp.port, "wrong")
    cpu_used = time.process_time() - cpu_before
    assert not ok
    # pam_unix's 2 s, varied by up to 25% as libpam does (plus the handshake itself).
    assert 1.5 <= fail_s - login_s + 0.08 <= 2.6, (fail_s, login_s)
    # The wait is a timer: this process (client and honeypot both) used far less CPU than it waited.
    assert cpu_used < 0.5 * fail_s, (cpu_used, fail_s)


async def test_success_is_quick_but_not_instant(honeypot: Callable[..., Any], tmp_path: Path) -> None:
    hp = await honeypot(auth={"failure_delay_s": 0, "success_delay_s": 0.3})
    _, fast = await attempt(hp.port, "hunter2")
    # A data dir of its own: two live honeypots must not share one (each closes what it finds open as crashed);
    # nor the capture gateway's namespace, which is one per sensor (the second refuses to start in it).
    other = {"data_dir": str(tmp_path / "data-2")}
    hp_default = await honeypot(
        auth={"failure_delay_s": 0, "success_delay_s": 0}, storage=other, network={"mode": "none"}
    )
    _, instant = await attempt(hp_default.port, "hunter2")
    assert fast - instant >= 0.2, (fast, instant)  # the configured delay is really applied


@pytest.mark.parametrize("wrong", ["", "x" * 300])
async def test_every_failure_waits(honeypot: Callable[..., Any], wrong: str) -> None:
    hp = await honeypot(auth={"failure_delay_s": 0.5, "success_delay_s": 0})
    ok, spent = await attempt(hp.port, wrong)
    assert not ok and spent >= 0.35
