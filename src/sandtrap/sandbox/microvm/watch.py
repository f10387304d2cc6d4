"""A VM that dies under its session: how the backend notices, and what it records.

One :class:`VMWatch` per VM this honeypot started follows two things:

- QEMU's exit (it is our child): killed by a signal, by the kernel's OOM killer at its cgroup's limit (told apart
  by the cgroup's ``oom_kill`` count), or powered off by the guest;
- QEMU's monitor: ``query-status`` every few seconds. A guest kernel panic stops the VM (``-action panic=pause``
  with a pvpanic device) and shows as ``guest-panicked``; a QEMU that does not answer for
  ``sandbox.microvm.unresponsive_s`` (stopped, wedged) counts as dead.

On the first failure ``failure`` says what happened (the bridge ends the session with it as the reason) and
``on_failure`` runs once (the sandbox drops its connections to the guest and kills what is left of QEMU). An
intended stop closes the watch first, so it records nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from sandtrap.errors import SandboxError
from sandtrap.sandbox.microvm import qemu

log = logging.getLogger(__name__)

PROBE_INTERVAL_S = 3.0
# Run states (QMP RunState) after which the guest will not run again by itself.
FAILED_STATES = {
    "guest-panicked": "guest kernel panic",
    "internal-error": "QEMU internal error",
    "io-error": "disk I/O error",
    "shutdown": "guest shut down",
}


def describe_exit(returncode: int, oom_kills: int) -> str:
    """Why QEMU ended, from its exit status and its cgroup's OOM kills."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        if returncode == -signal.SIGKILL and oom_kills:
            return "QEMU out of memory: killed by the kernel at its cgroup's memory limit"
        return f"QEMU killed by {name}"
    if returncode == 0:
        return "guest powered off (QEMU exited)"
    return f"QEMU exited with status {returncode}"


class VMWatch:
    def __init__(
        self,
        name: str,
        proc: asyncio.subprocess.Process,
        qmp_socket: Path,
        unresponsive_s: float,
        oom_kills: Callable[[], int],
        on_failure: Callable[[str], Coroutine[Any, Any, None]],
    ) -> None:
        self.name = name
        self.failure = ""
        self.returncode: int | None = None
        self._proc = proc
        self._qmp = qmp_socket
        self._unresponsive_s = unresponsive_s
        self._oom_kills = oom_kills
        self._on_failure = on_failure
        self._closing = False
        self._handler: asyncio.Task[None] | None = None
        self._tasks = [asyncio.create_task(self._exit()), asyncio.create_task(self._probe())]

    async def _exit(self) -> None:
        self.returncode = await self._proc.wait()
        self._fail(describe_exit(self.returncode, self._oom_kills()))

    async def _probe(self) -> None:
        answered = time.monotonic()
        while self.returncode is None:
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                async with asyncio.timeout(min(self._unresponsive_s, qemu.QMP_TIMEOUT_S)):
                    status = await qemu.qmp(self._qmp, "query-status")
            except (SandboxError, TimeoutError):
                silent_s = time.monotonic() - answered
                if self.returncode is None and silent_s >= self._unresponsive_s:
                    self._fail(f"guest stopped answering: QEMU's monitor silent for {silent_s:.0f}s")
                    return
                continue
            answered = time.monotonic()
            state = str(status.get("status", "")) if isinstance(status, dict) else ""
            if state in FAILED_STATES:
                self._fail(f"{FAILED_STATES[state]} (QEMU run state {state})")
                return

    def _fail(self, reason: str) -> None:
        if self._closing or self.failure:
            return
        self.failure = reason
        log.warning("VM %s failed: %s", self.name, reason)
        self._handler = asyncio.create_task(self._on_failure(reason))

    async def close(self) -> None:
        """Stop watching (an intended stop, or the failure handled); records nothing from here on."""
        self._closing = True
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
