"""The ``alerts`` section: rules that pick events, and the targets their alerts go to.

A rule names what it watches (``when``), how many matching events from one source within ``window_s`` make an
alert (``threshold``), at most how many alerts it sends per ``rate_period_s`` (``rate_limit``) and its targets
by name. A target is a generic JSON webhook, a Slack-compatible webhook or a command (argv, no shell) that
reads the alert's JSON on stdin. Command patterns are RE2 (linear time: no pattern backtracks).
"""

from __future__ import annotations

import os
from typing import Literal
from urllib.parse import urlsplit

import re2
from pydantic import Field, PrivateAttr, field_validator, model_validator

from sandtrap.config.values import Section

RULE_KINDS = ("login_success", "login_failed", "command", "transfer", "honeytoken", "new_hassh")
MAX_PATTERN_CHARS = 1000
# RE2's memory budget for one compiled pattern: a pattern needing more is refused at load.
PATTERN_MAX_MEM = 8 << 20


def compile_pattern(pattern: str) -> object:
    """The pattern compiled by RE2 (linear-time matching); ``re2.error`` when RE2 refuses it."""
    options = re2.Options()
    options.log_errors = False
    options.max_mem = PATTERN_MAX_MEM
    return re2.compile(pattern, options)


class AlertTarget(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", description="what rules call it")
    kind: Literal["webhook", "slack", "command"]
    url: str = Field("", description="webhook and slack: the http(s) URL to POST to (kept out of logs)")
    url_env: str = Field(
        "", pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$", description="or: the environment variable holding the URL"
    )
    argv: list[str] = Field(default_factory=list, description="command: the program and its arguments, no shell")
    timeout_s: float = Field(5.0, gt=0, le=300, description="one attempt: the request, or the command's run")
    retries: int = Field(3, ge=0, le=20, description="attempts after the first failed one")
    backoff_s: float = Field(0.5, gt=0, le=60, description="the first retry's delay; doubles each retry (jittered)")
    backoff_max_s: float = Field(30.0, gt=0, le=3600)
    queue_size: int = Field(1000, ge=1, le=1_000_000, description="alerts waiting for this target; more are dropped")
    max_output_bytes: int = Field(4096, ge=0, le=1 << 20, description="command: output kept for the log")
    env: dict[str, str] = Field(
        default_factory=dict,
        description="command: its environment besides PATH and LANG (sandtrap's own is not passed)",
    )

    _url: str = PrivateAttr("")

    @property
    def webhook_url(self) -> str:
        """``url``, or the value of the environment variable ``url_env`` names (read when the config loads)."""
        return self._url

    @model_validator(mode="after")
    def _kind_needs(self) -> AlertTarget:
        if self.kind in ("webhook", "slack"):
            if self.url and self.url_env:
                raise ValueError(f"alert target {self.name}: give url or url_env, not both")
            self._url = self.url
            if self.url_env:
                self._url = os.environ.get(self.url_env, "")
                if not self._url:
                    raise ValueError(
                        f"alert target {self.name}: url_env names {self.url_env}, which is not set; export it with "
                        "the webhook URL, or write the URL as url"
                    )
            parts = urlsplit(self._url)
            if parts.scheme not in ("http", "https") or not parts.hostname:
                where = f"the value of {self.url_env}" if self.url_env else "url"
                raise ValueError(f"alert target {self.name}: {where} must be an http(s) URL such as https://host/path")
            if self.argv or self.env:
                raise ValueError(f"alert target {self.name}: argv and env are for kind: command only")
        else:
            if not self.argv or not self.argv[0]:
                raise ValueError(f"alert target {self.name}: kind: command needs argv, e.g. [/usr/local/bin/notify]")
            if self.url or self.url_env:
                raise ValueError(f"alert target {self.name}: url and url_env are for kind: webhook or slack only")
        return self


class AlertRule(Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    when: Literal["login_success", "login_failed", "command", "transfer", "honeytoken", "new_hassh"]
    pattern: str = Field("", max_length=MAX_PATTERN_CHARS, description="when: command: an RE2 pattern searched in it")
    threshold: int = Field(1, ge=1, le=100_000, description="matching events from one source that make an alert")
    window_s: float = Field(60.0, gt=0, le=86_400, description="threshold: within this many seconds")
    rate_limit: int = Field(10, ge=1, le=100_000, description="alerts this rule sends per rate_period_s at most")
    rate_period_s: float = Field(60.0, gt=0, le=86_400)
    targets: list[str] = Field(min_length=1, description="target names (alerts.targets)")

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        if v:
            try:
                compile_pattern(v)
            except re2.error as exc:
                detail = exc.args[0].decode("utf-8", "replace") if exc.args and isinstance(exc.args[0], bytes) else exc
                raise ValueError(
                    f"not a valid RE2 pattern ({detail}); RE2 has no backreferences or lookaround"
                ) from None
        return v

    @model_validator(mode="after")
    def _pattern_for_commands(self) -> AlertRule:
        if self.when == "command" and not self.pattern:
            raise ValueError(f"alert rule {self.name}: when: command needs a pattern, e.g. 'wget|curl'")
        if self.when != "command" and self.pattern:
            raise ValueError(f"alert rule {self.name}: pattern is for when: command only")
        return self


class AlertSettings(Section):
    targets: list[AlertTarget] = Field(default_factory=list)
    rules: list[AlertRule] = Field(default_factory=list)
    max_field_chars: int = Field(1000, ge=16, le=100_000, description="a string from the event is cut to this")
    seen_hassh_max: int = Field(100_000, ge=1, le=10_000_000, description="HASSHes remembered (new_hassh)")
    max_sources: int = Field(10_000, ge=1, le=1_000_000, description="sources counted per rule (threshold)")

    @model_validator(mode="after")
    def _names(self) -> AlertSettings:
        names = [t.name for t in self.targets]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"targets: the name {dupes[0]} is used twice")
        rules = [r.name for r in self.rules]
        dupes = sorted({n for n in rules if rules.count(n) > 1})
        if dupes:
            raise ValueError(f"rules: the name {dupes[0]} is used twice")
        for i, rule in enumerate(self.rules):
            for name in rule.targets:
                if name not in names:
                    raise ValueError(
                        f"rules.{i}.targets names {name!r}, which is no target; define it under alerts.targets "
                        f"(defined: {', '.join(names) or 'none'})"
                    )
        return self
