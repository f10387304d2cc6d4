"""Alerts (issue 20): rules over the event stream, sent to webhooks, Slack and commands without ever blocking.

:mod:`.rules` decides (pure), :mod:`.payload` builds what is sent (attacker bytes as data), :mod:`.targets`
sends one attempt, :mod:`.delivery` queues, retries and counts per target, :mod:`.sink` ties them to the bus.
"""

from sandtrap.outputs.alerts.sink import AlertSink

__all__ = ["AlertSink"]
