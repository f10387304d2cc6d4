"""Recorded sessions for the API unit tests (import as ``from apidata import ...``)."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
from fastapi import FastAPI

from sandtrap import events as ev
from sandtrap.config import Settings
from sandtrap.events import Event
from sandtrap.storage.repository import Repository

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "storage"))

from storage_suite import SHA_CHANGED, SHA_UPLOAD, T0, Conn, full_session

# Three sessions: A (full: logins tried, shell + exec, an upload, a cast), B (admin from another address,
# an hour later, one command), C (failed logins only, two hours later, still open).
A, B, C = "0123456789ab", "00000000000b", "00000000000c"
IP_A, IP_B, IP_C = "203.0.113.7", "198.51.100.20", "198.51.100.30"
CAST_TEXT = '{"version": 2, "width": 80, "height": 24}\n[0.5, "o", "root@box:~# "]\n'
UPLOAD = b"#!/bin/sh\necho <script>alert(1)</script>\n"
B_COMMAND = "echo '<b>hi</b>' && curl http://x/%_y"

__all__ = ["SHA_CHANGED", "SHA_UPLOAD", "T0"]


def recorded_events() -> list[Event]:
    b = Conn(B, src_ip=IP_B, start=T0 + timedelta(hours=1))
    c = Conn(C, src_ip=IP_C, start=T0 + timedelta(hours=2))
    return [
        *full_session(A),
        b(ev.SESSION_CONNECT, after_s=0),
        b(ev.CLIENT_VERSION, version="SSH-2.0-Go"),
        b(ev.LOGIN_SUCCESS, username="admin", password="admin", method="password"),
        b(ev.COMMAND_INPUT, input=B_COMMAND, channel=0),
        b(ev.SESSION_CLOSED, duration="2.0", duration_ms=2000, reason="client_closed", bytes_in=5, bytes_out=7),
        c(ev.SESSION_CONNECT, after_s=0),
        c(ev.LOGIN_FAILED, username="oracle", password="oracle", method="password"),
        c(ev.LOGIN_FAILED, username="oracle\x00", password="\u202e<img>", method="password"),
    ]


@dataclass
class Recorded:
    settings: Settings
    repository: Repository

    @property
    def data_dir(self) -> Path:
        return self.settings.data_dir


def app_of(c: httpx.AsyncClient) -> FastAPI:
    app: FastAPI = c.app  # type: ignore[attr-defined]
    return app
