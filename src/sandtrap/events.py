"""Events for analysts: one pydantic schema, a catalogue of ids, a bus that hands each event to each sink.

Ids are Cowrie's where Cowrie has one (so pipelines built for Cowrie ingest the stream unchanged),
else ``sandtrap.<area>.<what>``. Field names follow Cowrie's (``session``, ``src_ip``, ``timestamp``).
A failing sink is counted and logged; it never breaks the session that emitted the event.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol
from uuid import uuid4

from pydantic import BaseModel, ConfigDict, Field, field_serializer

log = logging.getLogger(__name__)

# -- catalogue: id -> (fields an event of that id carries beyond the envelope, message template) --------
SESSION_CONNECT = "cowrie.session.connect"
CLIENT_VERSION = "cowrie.client.version"
CLIENT_KEX = "cowrie.client.kex"
CLIENT_FINGERPRINT = "cowrie.client.fingerprint"
LOGIN_SUCCESS = "cowrie.login.success"
LOGIN_FAILED = "cowrie.login.failed"
CLIENT_SIZE = "cowrie.client.size"
CLIENT_VAR = "cowrie.client.var"
COMMAND_INPUT = "cowrie.command.input"
SESSION_FILE_UPLOAD = "cowrie.session.file_upload"
SESSION_FILE_DOWNLOAD = "cowrie.session.file_download"
SESSION_FILE_DOWNLOAD_FAILED = "cowrie.session.file_download.failed"
DIRECT_TCPIP_REQUEST = "cowrie.direct-tcpip.request"
LOG_OPEN = "cowrie.log.open"
LOG_CLOSED = "cowrie.log.closed"
SESSION_CLOSED = "cowrie.session.closed"
SESSION_PARAMS = "cowrie.session.params"

SANDBOX_ASSIGNED = "sandtrap.sandbox.assigned"
SANDBOX_UNAVAILABLE = "sandtrap.sandbox.unavailable"
SANDBOX_RELEASED = "sandtrap.sandbox.released"
CHANNEL_OPEN = "sandtrap.channel.open"
CHANNEL_PTY = "sandtrap.channel.pty"
CHANNEL_SHELL = "sandtrap.channel.shell"
CHANNEL_EXEC = "sandtrap.channel.exec"
CHANNEL_SUBSYSTEM = "sandtrap.channel.subsystem"
CHANNEL_SIGNAL = "sandtrap.channel.signal"
CHANNEL_EXIT = "sandtrap.channel.exit"
CHANNEL_CLOSED = "sandtrap.channel.closed"
FORWARD_REQUEST = "sandtrap.forward.request"
X11_REQUEST = "sandtrap.x11.request"
AGENT_REQUEST = "sandtrap.agent.request"
LIMIT_HIT = "sandtrap.limit.hit"
AUTH_TOO_MANY = "sandtrap.login.too_many"
SESSION_FILE_CHANGED = "sandtrap.session.file_changed"
SESSION_CRASHED = "sandtrap.session.crashed"
HONEYTOKEN_ISSUED = "sandtrap.honeytoken.issued"
HONEYTOKEN_READ = "sandtrap.honeytoken.read"
SFTP_REQUEST = "sandtrap.sftp.request"
SCP_FILE = "sandtrap.scp.file"
TELNET_ANOMALY = "sandtrap.telnet.anomaly"
TELNET_CLIENT = "sandtrap.telnet.client"
STREAM_OPEN = "sandtrap.stream.open"
STREAM_INPUT = "sandtrap.stream.input"
STREAM_CLOSED = "sandtrap.stream.closed"
NETWORK_DNS = "sandtrap.network.dns"
NETWORK_HTTP = "sandtrap.network.http"
NETWORK_TCP = "sandtrap.network.tcp"
NETWORK_PCAP = "sandtrap.network.pcap"
NETWORK_DNS_SUMMARY = "sandtrap.network.dns_summary"

CATALOGUE: dict[str, tuple[tuple[str, ...], str]] = {
    SESSION_CONNECT: (
        ("src_ip", "src_port", "dst_ip", "dst_port"),
        "New connection: {src_ip}:{src_port} ({dst_ip}:{dst_port}) [session: {session}]",
    ),
    CLIENT_VERSION: (("version",), "Remote SSH version: {version}"),
    CLIENT_KEX: (
        ("hassh", "hasshAlgorithms", "kexAlgs", "keyAlgs", "encCS", "macCS", "compCS", "langCS"),
        "SSH client hassh fingerprint: {hassh}",
    ),
    CLIENT_FINGERPRINT: (
        ("username", "fingerprint", "key", "type"),
        "public key attempt for user {username} of type {type} with fingerprint {fingerprint}",
    ),
    LOGIN_SUCCESS: (("username", "method"), "login attempt [{username}] succeeded"),
    LOGIN_FAILED: (("username", "method"), "login attempt [{username}] failed"),
    AUTH_TOO_MANY: (("username", "attempts"), "too many authentication failures for {username}"),
    CLIENT_SIZE: (("width", "height"), "Terminal Size: {width} {height}"),
    CLIENT_VAR: (("name", "value"), "request_env: {name}={value}"),
    COMMAND_INPUT: (("input",), "CMD: {input}"),
    SESSION_FILE_UPLOAD: (
        ("filename", "destfile", "outfile", "shasum", "size", "via", "stored", "duplicate"),
        "Uploaded file {destfile} to {outfile}",
    ),
    SESSION_FILE_DOWNLOAD: (
        ("url", "outfile", "shasum", "destfile", "size", "stored", "duplicate", "redirects"),
        "Downloaded URL ({url}) with SHA-256 {shasum} to {outfile}",
    ),
    SESSION_FILE_DOWNLOAD_FAILED: (("url", "error"), "Attempt to download file(s) from URL ({url}) failed"),
    NETWORK_DNS: (("query", "qtype", "rcode", "answer"), "DNS {qtype} {query}: {rcode} {answer}"),
    NETWORK_HTTP: (("method", "url", "user_agent", "dst_ip", "dst_port"), "HTTP {method} {url}"),
    NETWORK_TCP: (
        ("dst_ip", "dst_port", "bytes_in", "bytes_out", "data", "duration"),
        "TCP to {dst_ip}:{dst_port}: {bytes_in} bytes from the box",
    ),
    NETWORK_PCAP: (("pcap", "size", "packets", "not_written"), "capture {pcap}: {packets} packets"),
    NETWORK_DNS_SUMMARY: (
        ("queries", "dropped", "names", "name_bytes", "longest"),
        "DNS: {queries} queries for {names} names ({name_bytes} bytes of names), {dropped} dropped",
    ),
    SESSION_FILE_CHANGED: (
        ("filename", "kind", "origin", "shasum", "size", "mode", "outfile", "stored"),
        "file {filename} {kind} in the sandbox ({origin})",
    ),
    SESSION_CRASHED: (("reason",), "session closed at start-up: the previous run ended without closing it"),
    DIRECT_TCPIP_REQUEST: (
        ("dst_ip", "dst_port", "orig_ip", "orig_port"),
        "direct-tcp connection request to {dst_ip}:{dst_port} from {orig_ip}:{orig_port}",
    ),
    LOG_OPEN: (("ttylog", "channel"), "Opening TTY Log: {ttylog}"),
    LOG_CLOSED: (
        ("ttylog", "channel", "size", "shasum", "duplicate", "duration", "duration_ms"),
        "Closing TTY Log: {ttylog} after {duration} seconds",
    ),
    SESSION_CLOSED: (("duration", "reason"), "Connection lost after {duration} seconds"),
    SESSION_PARAMS: (("arch",), "session parameters"),
    SANDBOX_ASSIGNED: (
        ("sandbox_id", "sandbox_name", "acquire_ms", "persona"),
        "sandbox {sandbox_name} ({persona}) assigned",
    ),
    SANDBOX_UNAVAILABLE: (("reason",), "no sandbox available: {reason}"),
    SANDBOX_RELEASED: (("sandbox_id", "sandbox_name"), "sandbox {sandbox_name} released for forensics"),
    CHANNEL_OPEN: (("channel",), "session channel {channel} opened"),
    CHANNEL_PTY: (("channel", "term", "width", "height"), "pty requested: {term} {width}x{height}"),
    CHANNEL_SHELL: (("channel",), "interactive shell started"),
    CHANNEL_EXEC: (("channel", "input"), "exec: {input}"),
    CHANNEL_SUBSYSTEM: (("channel", "subsystem"), "subsystem {subsystem} requested"),
    CHANNEL_SIGNAL: (("channel", "signal"), "signal {signal} requested"),
    CHANNEL_EXIT: (("channel", "exit_status"), "process exited with {exit_status}"),
    CHANNEL_CLOSED: (("channel", "bytes_in", "bytes_out"), "channel {channel} closed"),
    FORWARD_REQUEST: (("kind", "dst_ip", "dst_port"), "refused {kind} forwarding to {dst_ip}:{dst_port}"),
    X11_REQUEST: (("channel",), "refused X11 forwarding"),
    AGENT_REQUEST: (("channel",), "refused agent forwarding"),
    LIMIT_HIT: (("limit", "value"), "limit {limit} hit ({value})"),
    SFTP_REQUEST: (("channel", "op", "path"), "sftp {op} {path}"),
    HONEYTOKEN_ISSUED: (("kind", "path", "value"), "honeytoken {kind} planted at {path}"),
    HONEYTOKEN_READ: (("kind", "path"), "honeytoken {kind} at {path} was opened"),
    SCP_FILE: (("channel", "kind", "filename", "size", "mode"), "scp upload of {kind} {filename} ({size} bytes)"),
    TELNET_ANOMALY: (("kind", "detail"), "telnet: {kind} ({detail})"),
    TELNET_CLIENT: (("ttype", "tspeed", "xdisploc", "options"), "telnet client: terminal {ttype}"),
    STREAM_OPEN: (("target_port", "transport", "stream"), "{transport} stream to the box's port {target_port}"),
    STREAM_INPUT: (("input", "size"), "stream input: {input}"),
    STREAM_CLOSED: (
        ("target_port", "bytes_in", "bytes_out", "stream", "shasum", "reason"),
        "stream to port {target_port} closed: {bytes_in} bytes in, {bytes_out} out ({reason})",
    ),
}


def sensor_uuid(path: Path) -> str:
    """The sensor's persistent id (Cowrie's ``uuid``): made once, kept in the data dir."""
    try:
        value = path.read_text(encoding="ascii").strip()
        if value:
            return value
    except OSError:
        pass
    value = str(uuid4())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n", encoding="ascii")
    return value


def new_session_id() -> str:
    """Cowrie's session ids: 12 lowercase hex characters."""
    return secrets.token_hex(6)


class Event(BaseModel):
    """The envelope every event carries; per-id fields ride along as extra attributes."""

    model_config = ConfigDict(extra="allow", frozen=True)

    eventid: str
    timestamp: datetime = Field(default_factory=lambda: datetime.now(UTC))
    event_id: str = Field(default_factory=lambda: secrets.token_hex(8), description="unique per event")
    session: str = ""
    src_ip: str = ""
    src_port: int = 0
    dst_ip: str = ""
    dst_port: int = 0
    sensor: str = ""
    uuid: str = Field("", description="the sensor's persistent id, as Cowrie's envelope has it")
    protocol: str = "ssh"
    message: str = ""

    @field_serializer("timestamp")
    def _ts(self, value: datetime) -> str:
        return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    @property
    def fields(self) -> dict[str, Any]:
        return dict(self.__pydantic_extra__ or {})

    def get(self, name: str, default: Any = None) -> Any:
        return getattr(self, name, default) if name in type(self).model_fields else self.fields.get(name, default)


class EventSink(Protocol):
    """Receives every event. Must not block: a sink doing I/O queues internally."""

    def write(self, event: Event) -> None: ...


class EventBus:
    def __init__(self) -> None:
        self._sinks: list[EventSink] = []
        self.sink_errors = 0
        self.events_emitted = 0
        self._listeners: list[Callable[[Event], None]] = []

    def add_sink(self, sink: EventSink) -> None:
        self._sinks.append(sink)

    def emit(self, event: Event) -> None:
        self.events_emitted += 1
        for sink in self._sinks:
            try:
                sink.write(event)
            except Exception:
                self.sink_errors += 1
                log.exception("event sink %s failed on %s", type(sink).__name__, event.eventid)


class CaptureSink:
    """Keeps events in memory (tests, live views)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def write(self, event: Event) -> None:
        self.events.append(event)

    def of(self, eventid: str) -> list[Event]:
        return [e for e in self.events if e.eventid == eventid]


def _safe_format(template: str, values: dict[str, Any]) -> str:
    """Fill a message template; attacker text is only ever a value, never the template."""

    class _Missing(dict[str, Any]):
        def __missing__(self, key: str) -> str:
            return "?"

    return template.format_map(_Missing({k: v for k, v in values.items()}))


class Emitter:
    """Events of one connection: the envelope (session, addresses, sensor) is bound once."""

    def __init__(
        self,
        bus: EventBus,
        sensor: str,
        session: str,
        src_ip: str,
        src_port: int,
        dst_ip: str,
        dst_port: int,
        uuid: str = "",
        protocol: str = "ssh",
        service: str = "",
    ):
        self._bus = bus
        self.envelope: dict[str, Any] = {
            "protocol": protocol,
            "sensor": sensor,
            "uuid": uuid,
            "session": session,
            "src_ip": src_ip,
            "src_port": src_port,
            "dst_ip": dst_ip,
            "dst_port": dst_port,
        }
        if service:  # the listener's name (config `services`): e.g. http for a tcp service on 8081
            self.envelope["service"] = service

    @property
    def session(self) -> str:
        return str(self.envelope["session"])

    def emit(self, eventid: str, **fields: Any) -> Event:
        if eventid not in CATALOGUE:
            raise ValueError(f"event id {eventid!r} is not in the catalogue")
        _, template = CATALOGUE[eventid]
        values = {**self.envelope, **fields}
        event = Event(eventid=eventid, message=_safe_format(template, values), **values)
        self._bus.emit(event)
        return event


def cowrie_dict(event: Event) -> dict[str, Any]:
    """The event as Cowrie's JSON log has it: envelope plus fields, ``timestamp`` in ``...Z`` form."""
    data = event.model_dump(mode="json")
    # Cowrie 2.x names next to 3.x's where they differ (T-Pot and most dashboards read 2.x).
    if "duration_ms" in data and "duration" not in data:
        data["duration"] = f"{data['duration_ms'] / 1000:.1f}"
    return data
