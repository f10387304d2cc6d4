"""Which events make alerts: pure logic, no I/O (the seen-HASSH file is read and written by the caller).

A rule picks events by kind (and, for commands, an RE2 pattern), counts them per source within a window
(``threshold``), and lets at most ``rate_limit`` alerts through per ``rate_period_s``. Every structure is
bounded: sources per rule (``max_sources``), timestamps per source (``threshold``), HASSHes remembered.
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sandtrap import events as ev
from sandtrap.config.alerts import AlertRule, compile_pattern

# What each rule kind watches.
KIND_EVENTS: dict[str, frozenset[str]] = {
    "login_success": frozenset({ev.LOGIN_SUCCESS}),
    "login_failed": frozenset({ev.LOGIN_FAILED}),
    "command": frozenset({ev.COMMAND_INPUT}),  # exec requests too (source: exec), typed lines (source: tty)
    "transfer": frozenset({ev.SESSION_FILE_DOWNLOAD, ev.SESSION_FILE_UPLOAD}),
    "honeytoken": frozenset({ev.HONEYTOKEN_READ}),
    "new_hassh": frozenset({ev.CLIENT_KEX}),
}
# A command line is searched in its first this many characters (RE2 is linear; this bounds the constant).
MAX_MATCH_CHARS = 16_384
_HASSH = re.compile(r"^[0-9a-f]{32}$")


class SeenSet:
    """HASSHes seen, the oldest forgotten first past ``max_items``; ``dirty`` until the caller saved it."""

    def __init__(self, max_items: int, items: Iterable[str] = ()) -> None:
        self._max = max(1, max_items)
        self._items: OrderedDict[str, None] = OrderedDict()
        for item in items:
            if _HASSH.match(item):
                self._remember(item)
        self.dirty = False

    def _remember(self, item: str) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self._max:
            self._items.popitem(last=False)

    def add(self, item: str) -> bool:
        """True when ``item`` is new (it is remembered from now on)."""
        if item in self._items:
            self._items.move_to_end(item)
            return False
        self._remember(item)
        self.dirty = True
        return True

    def __len__(self) -> int:
        return len(self._items)

    def dump(self) -> str:
        self.dirty = False
        return "".join(f"{item}\n" for item in self._items)


@dataclass
class RuleCounters:
    matched: int = 0  # events the rule picked
    fired: int = 0  # alerts it made
    suppressed: int = 0  # alerts the rate limit held back


@dataclass
class RuleState:
    """One rule at run time: its compiled pattern, per-source counts and the rate limit's recent alerts."""

    rule: AlertRule
    max_sources: int
    seen: SeenSet | None = None
    counters: RuleCounters = field(default_factory=RuleCounters)
    _pattern: Any = field(default=None, init=False)
    _sources: OrderedDict[str, deque[float]] = field(default_factory=OrderedDict, init=False)
    _sent: deque[float] = field(default_factory=deque, init=False)  # when its latest alerts went out

    def __post_init__(self) -> None:
        if self.rule.pattern:
            self._pattern = compile_pattern(self.rule.pattern)

    def picks(self, event: ev.Event) -> bool:
        """Whether the event is of this rule's kind (and matches its pattern, a HASSH not seen before)."""
        if event.eventid not in KIND_EVENTS[self.rule.when]:
            return False
        if self._pattern is not None:
            text = event.get("input")
            return isinstance(text, str) and self._pattern.search(text[:MAX_MATCH_CHARS]) is not None
        if self.rule.when == "new_hassh":
            hassh = event.get("hassh")
            return (
                self.seen is not None and isinstance(hassh, str) and bool(_HASSH.match(hassh)) and self.seen.add(hassh)
            )
        return True

    def _reaches_threshold(self, source: str, now: float) -> tuple[bool, int]:
        threshold = self.rule.threshold
        if threshold == 1:
            return True, 1
        times = self._sources.get(source)
        if times is None:
            times = self._sources[source] = deque(maxlen=threshold)
            while len(self._sources) > self.max_sources:
                self._sources.popitem(last=False)
        else:
            self._sources.move_to_end(source)
        times.append(now)
        if len(times) == threshold and now - times[0] <= self.rule.window_s:
            del self._sources[source]  # the next alert for this source needs `threshold` more
            return True, threshold
        return False, len(times)

    def _rate_allows(self, now: float) -> bool:
        period = self.rule.rate_period_s
        while self._sent and now - self._sent[0] >= period:
            self._sent.popleft()
        if len(self._sent) >= self.rule.rate_limit:
            return False
        self._sent.append(now)
        return True

    def consider(self, event: ev.Event, now: float) -> int:
        """The number of events this alert stands for (its count), or 0 when the event makes no alert."""
        if not self.picks(event):
            return 0
        self.counters.matched += 1
        reached, count = self._reaches_threshold(event.src_ip or "?", now)
        if not reached:
            return 0
        if not self._rate_allows(now):
            self.counters.suppressed += 1
            return 0
        self.counters.fired += 1
        return count
