"""Alerts from a real honeypot (Docker backend) to receivers this test runs on 127.0.0.1.

A login (OpenSSH's ssh), a command matching a rule's pattern and failed attempts from one source each reach a
JSON webhook, a Slack-compatible webhook and a command target. A receiver that fails first is retried until
it takes the alert; one that never answers costs the sessions nothing. Counters show in /api/v1/status and
/metrics. Nothing here sends a byte beyond loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncssh
import httpx
import pytest
from aiohttp import web

from sandtrap.config.alerts import AlertTarget
from sandtrap.events import CLIENT_KEX, COMMAND_INPUT, LOGIN_FAILED, LOGIN_SUCCESS, SESSION_FILE_UPLOAD
from sandtrap.outputs.alerts.payload import Alert
from sandtrap.outputs.alerts.targets import CommandSender, SendError

from sshclient import asyncssh_connected, remote, scp_argv, ssh_argv
from sshclient import run as run_client

pytestmark = pytest.mark.timeout(300)
Honeypot = Callable[..., Any]


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1: records each POST (path, JSON body, arrival time); can fail or hang."""

    url: str = ""
    got: list[tuple[str, dict[str, Any], float]] = field(default_factory=list)
    fail_first: int = 0  # answer 503 to this many requests first
    hang_paths: set[str] = field(default_factory=set)  # never answer these
    hung: int = 0
    requests: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        if request.path in self.hang_paths:
            self.hung += 1
            await self.release.wait()
            return web.Response(status=200)
        if self.fail_first > 0:
            self.fail_first -= 1
            return web.Response(status=503)
        self.got.append((request.path, await request.json(), time.time()))
        return web.Response(status=204)

    def bodies(self, path: str) -> list[dict[str, Any]]:
        return [body for p, body, _ in self.got if p == path]

    async def wait_for(self, path: str, count: int = 1, timeout_s: float = 30.0, **match: Any) -> list[Any]:
        async with asyncio.timeout(timeout_s):
            while True:
                found = [b for b in self.bodies(path) if all(b.get(k) == v for k, v in match.items())]
                if len(found) >= count:
                    return found
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def receiver(**kw: Any) -> AsyncIterator[Receiver]:
    rec = Receiver(**kw)
    app = web.Application()
    app.router.add_post("/{tail:.*}", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}"
    try:
        yield rec
    finally:
        rec.release.set()
        await runner.cleanup()


def command_target(name: str, out: Path) -> dict[str, Any]:
    """A command target: a Python one-liner appending the JSON it reads on stdin to ``out``."""
    code = (
        "import os, sys; open(sys.argv[1], 'ab').write(sys.stdin.buffer.read() + b'\\n'); "
        "open(sys.argv[1] + '.env', 'w').write(' '.join(sorted(os.environ)))"
    )
    argv = [sys.executable, "-c", code, str(out)]
    return {"name": name, "kind": "command", "argv": argv, "timeout_s": 30, "env": {"ALERT_ROUTE": "test"}}


async def status_and_metrics(hp: Any) -> tuple[dict[str, Any], str]:
    base = f"http://127.0.0.1:{hp.services.api.port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        status = (await client.get("/api/v1/status")).json()
        metrics = (await client.get("/metrics")).text
    return status, metrics


async def test_login_command_and_failed_attempts_reach_webhook_slack_and_command(
    honeypot: Honeypot, tmp_path: Path
) -> None:
    out = tmp_path / "command-target.jsonl"
    async with receiver() as rec:
        hp = await honeypot(
            alerts={
                "targets": [
                    {"name": "hook", "kind": "webhook", "url": f"{rec.url}/hook/SECRET-TOKEN"},
                    {"name": "chat", "kind": "slack", "url": f"{rec.url}/slack/T0/B0/SECRET"},
                    command_target("pager", out),
                ],
                "rules": [
                    {"name": "login", "when": "login_success", "targets": ["hook", "chat", "pager"]},
                    {"name": "fetchers", "when": "command", "pattern": r"(wget|curl)\s", "targets": ["hook"]},
                    {"name": "brute", "when": "login_failed", "threshold": 3, "window_s": 120, "targets": ["hook"]},
                    {"name": "lure", "when": "honeytoken", "targets": ["hook"]},
                    {"name": "upload", "when": "transfer", "targets": ["hook"]},
                    {"name": "client", "when": "new_hassh", "targets": ["hook"]},
                ],
            }
        )
        # Three failed attempts from 127.0.0.1, one per connection: the third makes the brute alert.
        for i in range(3):
            with pytest.raises(asyncssh.PermissionDenied):
                async with asyncssh_connected(hp, password=f"wrong-<{i}>&"):
                    pass
        (brute,) = await rec.wait_for("/hook/SECRET-TOKEN", rule="brute")
        assert brute["count"] == 3 and brute["event"]["eventid"] == LOGIN_FAILED
        assert brute["event"]["src_ip"] == "127.0.0.1"

        # A login with OpenSSH's client, running a command that matches the fetchers pattern.
        command = "type wget curl >/dev/null 2>&1; cat /root/.aws/credentials >/dev/null; echo alert-test-done"
        done = await run_client(ssh_argv(hp.port, command))
        assert "alert-test-done" in done.out, done.err
        (login,) = await rec.wait_for("/hook/SECRET-TOKEN", rule="login")
        (fetch,) = await rec.wait_for("/hook/SECRET-TOKEN", rule="fetchers")
        (ok_event,) = hp.events(LOGIN_SUCCESS)  # the scp below logs in again (a second login alert)
        assert login["event"]["session"] == ok_event.session and login["event"]["username"] == "root"
        assert fetch["event"]["eventid"] == COMMAND_INPUT
        assert fetch["event"]["input"].startswith("type wget curl")
        (lure,) = await rec.wait_for("/hook/SECRET-TOKEN", rule="lure")
        assert lure["event"]["path"] == "/root/.aws/credentials" and lure["event"]["session"] == ok_event.session
        arrived = next(t for p, b, t in rec.got if p.startswith("/hook/") and b["rule"] == "login")
        latency = arrived - datetime.fromisoformat(login["event"]["timestamp"].replace("Z", "+00:00")).timestamp()
        print(f"[alerts] login success to the webhook receiver: {latency:.3f} s")

        (slack,) = await rec.wait_for("/slack/T0/B0/SECRET")
        assert slack["unfurl_links"] is False and "rule login" in slack["text"] and ok_event.session in slack["text"]
        async with asyncio.timeout(30):
            while not out.exists() or not out.read_text().strip():
                await asyncio.sleep(0.05)
        from_command = json.loads(out.read_text().splitlines()[0])
        assert from_command["rule"] == "login" and from_command["event"]["session"] == ok_event.session
        # Its environment: PATH, LANG and its own env, not sandtrap's (which may hold secrets).
        assert Path(f"{out}.env").read_text().split() == ["ALERT_ROUTE", "LANG", "PATH"]

        # An upload with OpenSSH's scp: a transfer alert.
        local = tmp_path / "dropper.sh"
        local.write_bytes(b"#!/bin/sh\necho dropped\n")
        copied = await run_client(scp_argv(hp.port, str(local), remote("/tmp/dropper.sh")))
        assert copied.returncode == 0, copied.err
        (upload,) = await rec.wait_for("/hook/SECRET-TOKEN", rule="upload")
        assert upload["event"]["eventid"] == SESSION_FILE_UPLOAD and upload["event"]["destfile"] == "/tmp/dropper.sh"

        # One alert per client fingerprint: asyncssh's (three connections) and OpenSSH's (ssh and scp).
        hasshes = {e.get("hassh") for e in hp.events(CLIENT_KEX)}
        assert len(hasshes) == 2
        clients = await rec.wait_for("/hook/SECRET-TOKEN", count=2, rule="client")
        expected = {("login", "hook"): 2, ("login", "chat"): 2, ("login", "pager"): 2, ("fetchers", "hook"): 1,
                    ("brute", "hook"): 1, ("lure", "hook"): 1, ("upload", "hook"): 1, ("client", "hook"): 2}  # fmt: skip
        async with asyncio.timeout(30):  # each target has its own queue: the slowest (the command) settles last
            while True:
                status, metrics = await status_and_metrics(hp)
                sent = {(d["rule"], d["target"]): d["sent"] for d in status["alerts"]["deliveries"]}
                if sum(sent.values()) >= sum(expected.values()):
                    break
                await asyncio.sleep(0.1)
    assert {c["event"]["hassh"] for c in clients} == hasshes and len(clients) == 2
    alerts = status["alerts"]
    assert alerts["ok"] is True
    assert sent == expected
    assert all("SECRET" not in t["address"] for t in alerts["targets"])
    assert 'sandtrap_alerts_sent_total{rule="login",target="chat"} 2.0' in metrics


async def test_a_flaky_receiver_is_retried_and_a_hung_one_blocks_no_session(honeypot: Honeypot) -> None:
    async with receiver(fail_first=2, hang_paths={"/hang"}) as rec:
        hp = await honeypot(
            alerts={
                "targets": [
                    {"name": "flaky", "kind": "webhook", "url": f"{rec.url}/flaky", "retries": 5, "backoff_s": 0.2},
                    {
                        "name": "hung",
                        "kind": "webhook",
                        "url": f"{rec.url}/hang",
                        "timeout_s": 3,
                        "retries": 0,
                        "queue_size": 1,
                    },
                ],
                "rules": [{"name": "login", "when": "login_success", "targets": ["flaky", "hung"]}],
            }
        )
        # Three sessions, one after the other, while every alert to `hung` waits for an answer that never comes.
        for i in range(3):
            async with asyncssh_connected(hp) as conn:
                result = await conn.run(f"echo session-{i}", timeout=60)
            assert result.stdout == f"session-{i}\n"
        assert rec.hung >= 1  # the sessions ran while the hung receiver held a request
        await rec.wait_for("/flaky", count=3)
        async with asyncio.timeout(30):
            while True:
                status, metrics = await status_and_metrics(hp)
                hung = next(t for t in status["alerts"]["targets"] if t["name"] == "hung")
                if hung["failed"] + hung["dropped"] + hung["sent"] == 3 and hung["queued"] == 0:
                    break
                await asyncio.sleep(0.2)
    flaky = next(t for t in status["alerts"]["targets"] if t["name"] == "flaky")
    assert (flaky["sent"], flaky["retried"], flaky["failed"]) == (3, 2, 0)
    assert hung["sent"] == 0 and hung["failed"] >= 1
    assert hung["last_error"] == "no answer within 3s" and status["alerts"]["ok"] is False
    assert 'sandtrap_alerts_retried_total{rule="login",target="flaky"} 2.0' in metrics


async def test_command_target_output_is_bounded_and_a_slow_one_is_killed_whole(tmp_path: Path) -> None:
    alert = Alert("r", "login_success", 1, {"eventid": LOGIN_SUCCESS, "message": "m"})
    chatty = AlertTarget(
        name="chatty", kind="command", argv=["sh", "-c", "cat >/dev/null; head -c 10000000 /dev/zero; exit 3"],
        max_output_bytes=1000,
    )  # fmt: skip
    sender = CommandSender(chatty)
    with pytest.raises(SendError, match="exited with 3"):
        await sender.send(alert)
    assert sender.last_output == bytes(1000)  # read to the end (the command finished), 1000 bytes kept
    # A command whose child outlives it: the whole process group is killed at timeout_s.
    slow = AlertTarget(name="slow", kind="command", argv=["sh", "-c", "sleep 600 & sleep 600"], timeout_s=1)
    sender = CommandSender(slow)
    with pytest.raises(SendError, match="did not finish within 1s"):
        await sender.send(alert)
    async with asyncio.timeout(10):
        while True:
            try:
                os.killpg(sender.last_pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
    missing = CommandSender(AlertTarget(name="gone", kind="command", argv=[str(tmp_path / "no-such-program")]))
    with pytest.raises(SendError, match="cannot run") as err:
        await missing.send(alert)
    assert err.value.retry is False
