"""A telnet login started as Debian's openbsd-inetd + inetutils-telnetd start one (``box/inetd.c``).

The box's PID 1 starts a second listener titled ``/usr/sbin/inetd`` when the host asks (``SIGUSR2``, harmless
when it runs already); it listens on :23 and serves the same requests as sshd's listener on its own socket, with
workers titled ``telnetd`` that hold the login's connection to :23 (``sandbox.connection_in_box``) on their fds
0-2. Boxes of a sensor with a telnet service ask for it when claimed (``sandbox.telnet_in_box``, set from
``services``), and again at each telnet login; others never have it. A box whose PID 1 is systemd (``sandbox.init: systemd``) is not
asked: its telnet logins go on as before, by sshd's listener (logged once).
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from sandtrap.sandbox.base import TermSize
from sandtrap.sandbox.host import broker, relay
from sandtrap.sandbox.host.boxwire import INETD_SOCKET_NAME

log = logging.getLogger(__name__)

INETD_SIGNAL = signal.SIGUSR2
_noted: set[str] = set()


def _note(reason: str) -> None:
    if reason not in _noted:
        _noted.add(reason)
        log.warning("telnet logins start under sshd's listener, not inetd's: %s", reason)


def _runs_systemd(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip() == "systemd"
    except OSError:
        return False


def ask_inetd(pid: int, is_same_box: Callable[[], bool]) -> bool:
    """Ask the box's PID 1 for inetd's listener (harmless when it runs); False when the box cannot have it (its
    PID 1 is systemd, or it is gone)."""
    if _runs_systemd(pid):
        _note("the box runs systemd (sandbox.init: systemd has no inetd unit yet)")
        return False
    try:
        if not is_same_box():
            return False
        os.kill(pid, INETD_SIGNAL)
    except OSError:
        return False
    return True


async def start(
    pid: int,
    is_same_box: Callable[[], bool],
    argv: Sequence[str | bytes],
    env: Mapping[str, str],
    user: str,
    workdir: str,
    tty: TermSize | None,
    plan: relay.RelayPlan | None,
) -> broker.BrokerProcess | None:
    """The login started by inetd's listener in the box (with ``plan``: its connection to :23 held by telnetd), or
    None (the reason logged once) when it cannot be: the caller starts it by sshd's listener instead."""
    if not ask_inetd(pid, is_same_box):  # the box's init starts inetd's listener once; the broker waits for it
        return None
    try:
        return await broker.start(pid, is_same_box, argv, env, user, workdir, tty, plan, INETD_SOCKET_NAME)
    except (broker.BrokerError, OSError) as exc:
        _note(f"inetd's listener did not answer ({exc})")
        return None
