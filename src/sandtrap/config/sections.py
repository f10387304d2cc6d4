"""The sections of :class:`~sandtrap.config.Settings` other than ``sandbox`` and ``image``: the SSH front end,
authentication, per-session limits, recording, storage and the API."""

from __future__ import annotations

import os
from typing import Any

from pydantic import Field, field_validator, model_validator

from sandtrap.config.values import ByteSize, Listen, Section, parse_size

# Debian bookworm's OpenSSH (the sandbox image's own sshd): the version string a scanner expects.
DEFAULT_SSH_VERSION = "SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u10"


class SSHSettings(Section):
    listen: Listen = "0.0.0.0:2222"
    version: str = DEFAULT_SSH_VERSION
    host_key_dir: str = Field("", description="default: <data_dir>/hostkeys")
    login_grace_time_s: float = Field(120.0, gt=0, description="OpenSSH LoginGraceTime")
    max_auth_tries: int = Field(6, ge=1, description="OpenSSH MaxAuthTries")
    advertised_port: int = Field(22, ge=1, le=65535, description="server port shown in SSH_CONNECTION")
    max_env_vars: int = Field(64, ge=0, description="client env requests kept per channel")
    max_sessions: int = Field(
        10, ge=1, le=1000, description="OpenSSH MaxSessions: session channels open at once on a connection"
    )

    @field_validator("version")
    @classmethod
    def _version(cls, v: str) -> str:
        if not v.startswith("SSH-2.0-") or any(c in v for c in "\r\n"):
            raise ValueError("must start with 'SSH-2.0-' and be one line, e.g. " + DEFAULT_SSH_VERSION)
        return v


class TelnetSettings(Section):
    """Every telnet service: what Debian's telnetd and login(1) show and when (login.defs, pam_faildelay)."""

    host_info: bool = Field(
        True,
        description="inetutils' telnetd (Debian's inetutils-telnetd): before the first prompt 'Linux RELEASE "
        "(HOSTNAME) (pts/0)' and a blank line; false = telnetd -h (no host information)",
    )
    banner: str = Field(
        "", description="a line shown before the first prompt ('' = none: inetutils' telnetd shows no /etc/issue.net)"
    )
    login_timeout_s: float = Field(60.0, gt=0, description="login.defs LOGIN_TIMEOUT")
    login_retries: int = Field(5, ge=1, description="login.defs LOGIN_RETRIES: wrong passwords before login exits")
    failure_delay_s: float = Field(3.0, ge=0, le=30, description="pam_faildelay: 'Login incorrect' after this")
    negotiation_wait_s: float = Field(1.0, ge=0, le=10, description="how long telnetd waits for option answers")

    @field_validator("banner")
    @classmethod
    def _banner(cls, v: str) -> str:
        if any(not c.isprintable() for c in v):
            raise ValueError("must be one line of printable text (e.g. Debian GNU/Linux 12)")
        return v


class Credential(Section):
    username: str
    password: str = Field(description="'*' accepts any password for this username")


class AuthSettings(Section):
    credentials: list[Credential] = Field(
        default_factory=lambda: [
            Credential(username="root", password="123456"),
            Credential(username="root", password="password"),
            Credential(username="admin", password="admin"),
        ]
    )
    accept_all_after: int = Field(3, ge=0, description="accept any password after N failures; 0 = never")
    remember_ip: bool = Field(False, description="count failures per source IP across connections")
    remember_ip_ttl_s: float = Field(3600.0, gt=0)
    accept_publickey: bool = False
    keyboard_interactive: bool = Field(False, description="offer keyboard-interactive (Debian's sshd does not)")
    # sshd with PAM: pam_unix delays a failure by 2 s (libpam varies it by up to 25%); a login is ~0.1 s.
    failure_delay_s: float = Field(2.0, ge=0, le=30, description="answer to a wrong password after this (±25%)")
    success_delay_s: float = Field(0.08, ge=0, le=5, description="answer to a right password after this (±25%)")


class LimitsSettings(Section):
    max_sessions: int = Field(100, ge=1, description="concurrent connections overall")
    max_sessions_per_ip: int = Field(5, ge=1, description="concurrent connections per source IP")
    idle_timeout_s: float = Field(600.0, gt=0, description="no input or output for this long ends the session")
    max_duration_s: float = Field(3600.0, gt=0, description="a session ends after this long")
    max_bytes_in: ByteSize = Field(parse_size("256m"), description="bytes from the attacker per session")
    max_bytes_out: ByteSize = Field(parse_size("1g"), description="bytes to the attacker per session")


class StorageSettings(Section):
    data_dir: str = "./data"
    database_url: str = Field("", description="default: sqlite:///<data_dir>/sandtrap.db")
    buffer_events: int = Field(
        100_000,
        ge=100,
        description="events held in memory while the database is down; beyond, they are replayed from the JSON log",
    )


class RecordingSettings(Section):
    jsonlog: bool = True
    jsonlog_rotate_bytes: ByteSize = parse_size("100m")
    jsonlog_rotate_daily: bool = True
    casts: bool = True
    cast_flush_interval_s: float = Field(0.5, gt=0, le=1.0, description="SIGKILL loses at most this much")
    max_cast_bytes: ByteSize = Field(parse_size("64m"), description="per channel; later output is counted only")
    artifact_max_file_bytes: ByteSize = parse_size("20m")
    artifact_max_session_bytes: ByteSize = parse_size("100m")
    artifact_max_total_bytes: ByteSize = parse_size("5g")
    changed_metadata_only: list[str] = Field(
        default_factory=lambda: [
            "/var/log/auth.log",
            "/var/log/syslog",
            "/var/log/wtmp",
            "/var/log/btmp",
            "/var/log/lastlog",
            "/run/utmp",
            "/run/crond.pid",
            "/run/crond.reboot",
            "/etc/shadow-",
            "/etc/passwd-",
            "/etc/group-",
            "/etc/gshadow-",
        ],
        description="changed files reported without storing their content (written by every login)",
    )


class APISettings(Section):
    listen: Listen = "127.0.0.1:8080"
    token: str = ""
    token_env: str = Field(
        "",
        pattern=r"^([A-Za-z_][A-Za-z0-9_]*)?$",
        description="or: the environment variable holding the token, read when the config loads (deploy/compose.yaml)",
    )

    @model_validator(mode="before")
    @classmethod
    def _token_from_env(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not data.get("token_env"):
            return data
        name = str(data["token_env"])
        if data.get("token"):
            raise ValueError("give api.token or api.token_env, not both")
        value = os.environ.get(name, "")
        # Unset: no token, which a non-loopback api.listen refuses at start (the engine proxy, reading the same
        # file, needs none).
        return {**data, "token": value} if value else data
