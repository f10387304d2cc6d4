"""Where alerts go: an HTTP POST (generic JSON or Slack's ``{"text": ...}``) or a command with the JSON on stdin.

One :meth:`send` is one attempt, bounded by the target's ``timeout_s``; it raises :class:`SendError` (with a
message fit for logs: no URL path, output cut and escaped) and says whether a retry may help.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from typing import Protocol

import aiohttp

from sandtrap.config.alerts import AlertTarget
from sandtrap.errors import SandtrapError
from sandtrap.outputs.alerts.payload import Alert, redact

# An HTTP answer worth retrying: the receiver is busy or broken for now.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
USER_AGENT = "sandtrap-alerts"
DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"


class SendError(SandtrapError):
    def __init__(self, message: str, *, retry: bool = True) -> None:
        super().__init__(message)
        self.retry = retry


class Sender(Protocol):
    description: str  # for logs and status: kind and redacted address

    async def send(self, alert: Alert) -> None: ...

    async def close(self) -> None: ...


class WebhookSender:
    """POSTs the alert as JSON (``slack``: Slack's ``{"text": ...}``); a 2xx answer is success."""

    def __init__(self, target: AlertTarget) -> None:
        self._target = target
        self._url = target.webhook_url
        self.description = f"{target.kind} {redact(self._url)}"
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self._target.timeout_s),
                headers={"User-Agent": USER_AGENT},
            )
        return self._session

    async def send(self, alert: Alert) -> None:
        body = alert.as_slack() if self._target.kind == "slack" else alert.as_json()
        try:
            async with (
                asyncio.timeout(self._target.timeout_s),
                self._client().post(
                    self._url, data=body, headers={"Content-Type": "application/json"}, allow_redirects=False
                ) as resp,
            ):
                status = resp.status
        except TimeoutError:
            raise SendError(f"no answer within {self._target.timeout_s:g}s") from None
        except aiohttp.ClientError as exc:
            # aiohttp's messages may hold the URL: only its type and the redacted address are kept.
            raise SendError(f"{type(exc).__name__} posting to {redact(self._url)}") from None
        if not 200 <= status < 300:
            raise SendError(f"HTTP {status}", retry=status in RETRY_STATUSES)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class CommandSender:
    """Runs ``argv`` (no shell) with the alert's JSON on stdin; exit status 0 is success.

    Its environment is PATH, LANG and the target's ``env``. The command runs in a process group of its own, killed whole when ``timeout_s`` passes. Its output
    (stdout and stderr together) is read to the end, the first ``max_output_bytes`` kept for the log.
    """

    def __init__(self, target: AlertTarget) -> None:
        self._target = target
        self.description = f"command {os.path.basename(target.argv[0])}"
        self.last_output = b""
        self.last_pid = 0  # the latest run's process (and process group) id
        # Not sandtrap's environment (it may hold the database URL's password): PATH, LANG and the target's env.
        self._env = {"PATH": os.environ.get("PATH", DEFAULT_PATH), "LANG": "C.UTF-8", **target.env}

    async def send(self, alert: Alert) -> None:
        target = self._target
        try:
            proc = await asyncio.create_subprocess_exec(
                *target.argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=self._env,
            )
        except OSError as exc:
            raise SendError(f"cannot run {target.argv[0]}: {exc.strerror}", retry=False) from None
        self.last_pid = proc.pid
        try:
            async with asyncio.timeout(target.timeout_s):
                output = await self._talk(proc, alert.as_json())
                code = await proc.wait()
        except TimeoutError:
            raise SendError(f"{self.description} did not finish within {target.timeout_s:g}s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        self.last_output = output
        if code != 0:
            shown = output[:200].decode("utf-8", "replace").encode("unicode_escape").decode("ascii")
            raise SendError(f"{self.description} exited with {code}: {shown}")

    async def _talk(self, proc: asyncio.subprocess.Process, body: bytes) -> bytes:
        assert proc.stdin is not None and proc.stdout is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            proc.stdin.write(body)
            await proc.stdin.drain()
        proc.stdin.close()
        kept = bytearray()
        limit = self._target.max_output_bytes
        while chunk := await proc.stdout.read(65536):
            if len(kept) < limit:
                kept += chunk[: limit - len(kept)]
        return bytes(kept)

    async def close(self) -> None:
        return None


def make_sender(target: AlertTarget) -> Sender:
    return CommandSender(target) if target.kind == "command" else WebhookSender(target)
