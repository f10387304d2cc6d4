"""Where a sandtrap session's wall-clock time goes, from the stamps of its own events.

Stages per session (each event is emitted when that step is done):

* ``connect → login``: key exchange and password check (``cowrie.login.success``);
* ``login → box``: the sandbox lease, pool acquire plus per-box set-up (``sandtrap.sandbox.assigned``);
* ``box → process``: account set-up in the box and the ``docker exec`` of the session (``cowrie.log.open``);
* ``close → record``: after the channel closed, collecting the box's changes (``cowrie.session.closed``);
* ``record → released``: stopping the box for forensics (``sandtrap.sandbox.released``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from bench.stats import summary

STAGES = {
    "connect → login": ("cowrie.session.connect", "cowrie.login.success"),
    "login → box": ("cowrie.login.success", "sandtrap.sandbox.assigned"),
    "box → process": ("sandtrap.sandbox.assigned", "cowrie.log.open"),
    "close → record": ("sandtrap.channel.closed", "cowrie.session.closed"),
    "record → released": ("cowrie.session.closed", "sandtrap.sandbox.released"),
}


def _t(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def stages(events: list[dict[str, Any]], start: str, end: str) -> dict[str, dict[str, Any]]:
    """Per stage, a summary (ms) over the sessions that logged in between ``start`` and ``end``."""
    by_session: dict[str, dict[str, float]] = {}
    for e in events:
        first = by_session.setdefault(e.get("session", ""), {})
        eid = e.get("eventid", "")
        if eid in first and eid != "sandtrap.channel.closed":
            continue  # the first of each, except the last channel close
        first[eid] = _t(e)
    window = (
        datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp(),
        datetime.fromisoformat(end.replace("Z", "+00:00")).timestamp(),
    )
    out: dict[str, list[float]] = {name: [] for name in STAGES}
    for stamps in by_session.values():
        login = stamps.get("cowrie.login.success")
        if login is None or not window[0] <= login <= window[1]:
            continue
        for name, (a, b) in STAGES.items():
            if a in stamps and b in stamps and stamps[b] >= stamps[a]:
                out[name].append((stamps[b] - stamps[a]) * 1000)
    return {name: summary(values, "ms") for name, values in out.items()}
