"""Alert delivery with a fake sender: retries with backoff, giving up, a full queue dropping (counted), a hung
target never holding up ``write``, events from another thread, and the counters in status and metrics."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from sandtrap import events as ev
from sandtrap.config.alerts import AlertSettings
from sandtrap.outputs.alerts import AlertSink
from sandtrap.outputs.alerts.payload import Alert
from sandtrap.outputs.alerts.targets import SendError


class FakeSender:
    """Fails the first ``failures`` attempts (retryable or not), then takes alerts; ``hang`` never answers."""

    description = "fake"

    def __init__(self, failures: int = 0, retry: bool = True, hang: bool = False) -> None:
        self.failures = failures
        self.retry = retry
        self.hang = hang
        self.attempts = 0
        self.got: list[Alert] = []
        self.closed = False

    async def send(self, alert: Alert) -> None:
        self.attempts += 1
        if self.hang:
            await asyncio.Event().wait()
        if self.attempts <= self.failures:
            raise SendError(f"attempt {self.attempts} refused", retry=self.retry)
        self.got.append(alert)

    async def close(self) -> None:
        self.closed = True


def settings(**target: Any) -> AlertSettings:
    return AlertSettings.model_validate(
        {
            "targets": [{"name": "t", "kind": "command", "argv": ["/bin/true"], "backoff_s": 0.001, **target}],
            "rules": [{"name": "login", "when": "login_success", "rate_limit": 1000, "targets": ["t"]}],
        }
    )


def login(src_ip: str = "192.0.2.1") -> ev.Event:
    return ev.Event(eventid=ev.LOGIN_SUCCESS, session="0123456789ab", src_ip=src_ip, username="root")


async def wait_until(check: Any) -> None:
    async with asyncio.timeout(10):
        while not check():
            await asyncio.sleep(0.001)


async def test_a_failing_target_is_retried_until_it_takes_the_alert(tmp_path: Path) -> None:
    fake = FakeSender(failures=2)
    sink = AlertSink(settings(retries=3), tmp_path, senders={"t": fake})
    await sink.start()
    sink.write(login())
    await wait_until(lambda: fake.got)
    await sink.close()
    (delivery,) = sink.status()["deliveries"]
    assert delivery == {"rule": "login", "target": "t", "sent": 1, "failed": 0, "dropped": 0, "retried": 2}
    assert fake.attempts == 3 and fake.closed
    assert sink.status()["ok"] is True


async def test_retries_run_out_and_a_final_refusal_is_not_retried(tmp_path: Path) -> None:
    exhausted, final = FakeSender(failures=10), FakeSender(failures=1, retry=False)
    for fake, retries, expect in ((exhausted, 2, (0, 1, 2)), (final, 5, (0, 1, 0))):
        sink = AlertSink(settings(retries=retries), tmp_path, senders={"t": fake})
        await sink.start()
        sink.write(login())
        await wait_until(lambda sink=sink: sink.status()["deliveries"][0]["failed"])
        status = sink.status()
        await sink.close()
        d = status["deliveries"][0]
        assert (d["sent"], d["failed"], d["retried"]) == expect
        assert status["ok"] is False and status["error"] == "failing: t"
        assert status["targets"][0]["last_error"].startswith("attempt ")


async def test_a_hung_target_never_holds_up_write_and_a_full_queue_drops(tmp_path: Path) -> None:
    fake = FakeSender(hang=True)
    sink = AlertSink(settings(queue_size=3), tmp_path, senders={"t": fake})
    await sink.start()
    sink.write(login())
    await wait_until(lambda: fake.attempts == 1)  # the worker is stuck on it
    for i in range(10):
        sink.write(login(f"192.0.2.{i}"))  # returns at once: the queue takes it or drops it
    status = sink.status()
    assert status["deliveries"][0]["dropped"] == 10 - 3  # three queued behind the hung one
    assert status["targets"][0]["queued"] == 3
    await sink.close(grace_s=0.01)  # the hung attempt is cancelled at close
    assert fake.closed


async def test_events_from_another_thread_reach_the_rules_on_the_loop(tmp_path: Path) -> None:
    fake = FakeSender()
    sink = AlertSink(settings(), tmp_path, senders={"t": fake})
    await sink.start()
    thread = threading.Thread(target=sink.write, args=(login(),))
    thread.start()
    thread.join()
    await wait_until(lambda: fake.got)
    await sink.close()
    assert fake.got[0].event["username"] == "root"


async def test_metrics_per_rule_and_target(tmp_path: Path) -> None:
    fake = FakeSender(failures=1)
    sink = AlertSink(settings(), tmp_path, senders={"t": fake})
    registry = CollectorRegistry()
    registry.register(sink)
    await sink.start()
    sink.write(login())
    await wait_until(lambda: fake.got)
    await sink.close()
    text = generate_latest(registry).decode()
    assert 'sandtrap_alerts_sent_total{rule="login",target="t"} 1.0' in text
    assert 'sandtrap_alerts_retried_total{rule="login",target="t"} 1.0' in text
    assert 'sandtrap_alerts_dropped_total{rule="login",target="t"} 0.0' in text
    assert 'sandtrap_alerts_fired_total{rule="login"} 1.0' in text
    assert 'sandtrap_alerts_queued{target="t"} 0.0' in text
