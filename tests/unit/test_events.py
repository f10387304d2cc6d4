"""Events: the catalogue, safe message templates, UTC timestamps, and a bus that survives a bad sink."""

from __future__ import annotations

import ast
import json
import logging
import re
import string
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from sandtrap import events
from sandtrap.events import (
    CATALOGUE,
    CLIENT_VAR,
    COMMAND_INPUT,
    LOGIN_FAILED,
    SESSION_CONNECT,
    CaptureSink,
    Emitter,
    Event,
    EventBus,
)

SRC = Path(events.__file__).resolve().parent
ENVELOPE = {"sensor", "session", "src_ip", "src_port", "dst_ip", "dst_port"}


def emitter(bus: EventBus | None = None) -> tuple[Emitter, CaptureSink]:
    bus = bus or EventBus()
    sink = CaptureSink()
    bus.add_sink(sink)
    return Emitter(bus, "sensor-1", "a1b2c3d4e5f6", "192.0.2.10", 50123, "10.0.0.5", 2222), sink


# -- the catalogue ---------------------------------------------------------------------------------


def placeholders(template: str) -> list[tuple[str, str | None, str | None]]:
    return [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]


@pytest.mark.parametrize("eventid", sorted(CATALOGUE))
def test_template_placeholders_are_envelope_or_listed_fields(eventid: str) -> None:
    fields, template = CATALOGUE[eventid]
    # Cowrie has one four-part id: cowrie.session.file_download.failed.
    assert re.fullmatch(r"(cowrie|sandtrap)\.[a-z0-9_-]+\.[a-z0-9_-]+(\.failed)?", eventid)
    assert len(set(fields)) == len(fields), "a field is listed twice"
    for name, spec, conv in placeholders(template):
        assert name in ENVELOPE or name in fields, f"{eventid}: {{{name}}} is neither envelope nor a listed field"
        assert not spec and conv is None, f"{eventid}: {{{name}}} carries a format spec or conversion"


@pytest.mark.parametrize("eventid", sorted(CATALOGUE))
def test_every_id_emits_with_its_fields_and_fills_its_template(eventid: str) -> None:
    em, sink = emitter()
    fields, _ = CATALOGUE[eventid]
    values: dict[str, Any] = {f: 40000 + i if f.endswith("_port") else f"<{f}>" for i, f in enumerate(fields)}
    event = em.emit(eventid, **values)
    assert sink.events == [event]
    assert event.eventid == eventid
    assert "?" not in event.message  # no placeholder was left unfilled
    for name, _, _ in placeholders(CATALOGUE[eventid][1]):
        expected = values.get(name, em.envelope.get(name))
        assert str(expected) in event.message
    for f in fields:
        assert event.get(f) == values[f]


def test_unknown_id_is_rejected_and_nothing_is_emitted() -> None:
    em, sink = emitter()
    for bad in ["cowrie.login.succeeded", "", "COWRIE.LOGIN.SUCCESS", "sandtrap.channel"]:
        with pytest.raises(ValueError, match="not in the catalogue"):
            em.emit(bad, username="root")
    assert sink.events == []


# -- every id the code emits is catalogued -----------------------------------------------------------


def _event_constants() -> dict[str, str]:
    return {k: v for k, v in vars(events).items() if k.isupper() and isinstance(v, str) and "." in v}


Stack = tuple[ast.FunctionDef | ast.AsyncFunctionDef, ...]


class _Calls(ast.NodeVisitor):
    """Every call in a module, with the functions it sits in (innermost last)."""

    def __init__(self) -> None:
        self.stack: list[ast.FunctionDef | ast.AsyncFunctionDef] = []
        self.calls: list[tuple[ast.Call, Stack]] = []

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.stack.append(node)
        self.generic_visit(node)
        self.stack.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def visit_Call(self, node: ast.Call) -> None:
        self.calls.append((node, tuple(self.stack)))
        self.generic_visit(node)


def _callee(call: ast.Call) -> str | None:
    if isinstance(call.func, ast.Attribute):
        return call.func.attr
    return call.func.id if isinstance(call.func, ast.Name) else None


def _resolve(node: ast.expr, stack: Stack, calls: list[tuple[ast.Call, Stack]], constants: dict[str, str]) -> set[str]:
    """The event ids an expression can evaluate to: constants, literals, conditionals, local variables,
    and parameters (followed to every call site of their function in the same module)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, ast.IfExp):
        return _resolve(node.body, stack, calls, constants) | _resolve(node.orelse, stack, calls, constants)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "events":
        return {constants[node.attr]}
    if isinstance(node, ast.Name) and node.id in constants:
        return {constants[node.id]}
    if isinstance(node, ast.Name):
        for depth in range(len(stack) - 1, -1, -1):
            func = stack[depth]
            assigned = [
                a.value
                for a in ast.walk(func)
                if isinstance(a, ast.Assign) and any(isinstance(t, ast.Name) and t.id == node.id for t in a.targets)
            ]
            if assigned:
                return set().union(*(_resolve(v, stack[: depth + 1], calls, constants) for v in assigned))
            params = [a.arg for a in (*func.args.posonlyargs, *func.args.args)]
            if node.id in params:
                index = params.index(node.id) - (1 if params[0] in ("self", "cls") else 0)
                found: set[str] = set()
                sites = [(c, st) for c, st in calls if _callee(c) == func.name]
                assert sites, f"{func.name}() is never called, so {node.id!r} cannot be followed"
                for call, site_stack in sites:
                    arg = next((k.value for k in call.keywords if k.arg == node.id), None)
                    arg = arg if arg is not None else call.args[index]
                    found |= _resolve(arg, site_stack, calls, constants)
                return found
    raise AssertionError(f"cannot tell which event id {ast.unparse(node)!r} is")


def emitted_ids() -> dict[str, set[str]]:
    """Event id -> the places (file:line) that emit it, from every ``emit(`` call under src/sandtrap."""
    constants = _event_constants()
    found: dict[str, set[str]] = {}
    for path in sorted(SRC.rglob("*.py")):
        if "rootfs" in path.parts:
            continue
        scan = _Calls()
        scan.visit(ast.parse(path.read_text(encoding="utf-8")))
        for call, stack in scan.calls:
            if _callee(call) not in {"emit", "_emit"} or not call.args:
                continue
            receiver = call.func.value if isinstance(call.func, ast.Attribute) else None
            if isinstance(receiver, ast.Attribute) and receiver.attr == "_bus":
                continue  # Emitter handing a finished Event to the bus
            where = f"{path.relative_to(SRC)}:{call.lineno}"
            for eventid in _resolve(call.args[0], stack, scan.calls, constants):
                found.setdefault(eventid, set()).add(where)
    return found


def test_every_event_id_emitted_in_src_is_catalogued() -> None:
    found = emitted_ids()
    # The scan really sees the code: ids emitted from the server, the channel and both branches of a conditional.
    assert {
        events.SESSION_CONNECT,
        events.SESSION_CLOSED,
        events.CHANNEL_PTY,
        events.CLIENT_VAR,
        events.LOGIN_SUCCESS,
        events.LOGIN_FAILED,
        events.AUTH_TOO_MANY,
        events.SCP_FILE,
    } <= set(found)
    assert sum(len(w) for w in found.values()) >= 25
    missing = {eventid: sorted(where) for eventid, where in found.items() if eventid not in CATALOGUE}
    assert missing == {}


def test_every_event_constant_is_catalogued() -> None:
    constants = _event_constants()
    assert len(constants) == len(CATALOGUE)
    assert set(constants.values()) == set(CATALOGUE)


# -- attacker text stays data -----------------------------------------------------------------------

HOSTILE = [
    "{session}",
    "{0}",
    "{}",
    "{src_ip.__class__.__mro__}",
    "{username!r:>99999999}",
    "{:>99999999}",
    "%s%s%n%x",
    "}{",
    "{{session}}",
    "\x1b[2J\r\n\x00",
]


@pytest.mark.parametrize("text", HOSTILE)
def test_attacker_text_in_values_is_never_interpreted(text: str) -> None:
    em, sink = emitter()
    event = em.emit(CLIENT_VAR, name=text, value=text)
    assert event.message == f"request_env: {text}={text}"
    assert event.get("name") == text and event.get("value") == text
    event = em.emit(COMMAND_INPUT, input=text)
    assert event.message == f"CMD: {text}"
    # ... and it survives JSON serialisation as the same string.
    assert json.loads(event.model_dump_json())["input"] == text
    assert len(sink.events) == 2


def test_missing_field_fills_a_marker_instead_of_failing() -> None:
    em, _ = emitter()
    event = em.emit(LOGIN_FAILED, method="password")
    assert event.message == "login attempt [?] failed"


def test_envelope_is_bound_once_and_carried_by_every_event() -> None:
    em, sink = emitter()
    em.emit(SESSION_CONNECT)
    em.emit(LOGIN_FAILED, username="root", method="password")
    for e in sink.events:
        assert (e.sensor, e.session, e.src_ip, e.src_port, e.dst_ip, e.dst_port) == (
            "sensor-1",
            "a1b2c3d4e5f6",
            "192.0.2.10",
            50123,
            "10.0.0.5",
            2222,
        )
        assert e.protocol == "ssh"
    assert sink.events[0].message == "New connection: 192.0.2.10:50123 (10.0.0.5:2222) [session: a1b2c3d4e5f6]"


def test_session_ids_look_like_cowrie_ones() -> None:
    ids = {events.new_session_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(re.fullmatch(r"[0-9a-f]{12}", i) for i in ids)


# -- timestamps --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        (datetime(2024, 2, 29, 23, 59, 59, 123456, tzinfo=UTC), "2024-02-29T23:59:59.123456Z"),
        (datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC), "2024-01-02T03:04:05.000000Z"),
        # Another zone is converted to UTC, not just relabelled.
        (datetime(2024, 3, 1, 1, 30, 0, 7, tzinfo=timezone(timedelta(hours=2))), "2024-02-29T23:30:00.000007Z"),
        (datetime(2023, 12, 31, 20, 0, 0, 500000, tzinfo=timezone(timedelta(hours=-5))), "2024-01-01T01:00:00.500000Z"),
    ],
)
def test_timestamp_serialises_as_utc_with_microseconds_and_z(when: datetime, expected: str) -> None:
    event = Event(eventid=SESSION_CONNECT, timestamp=when)
    assert event.model_dump(mode="json")["timestamp"] == expected
    assert json.loads(event.model_dump_json())["timestamp"] == expected


def test_emitted_timestamp_is_now_in_utc() -> None:
    em, _ = emitter()
    before = datetime.now(UTC)
    event = em.emit(SESSION_CONNECT)
    after = datetime.now(UTC)
    assert event.timestamp.utcoffset() == timedelta(0)
    assert before <= event.timestamp <= after
    text = event.model_dump(mode="json")["timestamp"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", text)
    assert datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC) == event.timestamp


# -- the bus -----------------------------------------------------------------------------------------


class BrokenSink:
    def __init__(self) -> None:
        self.calls = 0

    def write(self, event: Event) -> None:
        self.calls += 1
        raise RuntimeError("disk full")


def test_failing_sink_is_counted_logged_and_others_still_receive(caplog: pytest.LogCaptureFixture) -> None:
    bus = EventBus()
    before, broken, after = CaptureSink(), BrokenSink(), CaptureSink()
    for sink in (before, broken, after):
        bus.add_sink(sink)
    em = Emitter(bus, "s", "0123456789ab", "192.0.2.1", 1, "10.0.0.1", 22)
    with caplog.at_level(logging.ERROR, logger="sandtrap.events"):
        em.emit(SESSION_CONNECT)
        em.emit(LOGIN_FAILED, username="root", method="password")
    assert [e.eventid for e in before.events] == [SESSION_CONNECT, LOGIN_FAILED]
    assert [e.eventid for e in after.events] == [SESSION_CONNECT, LOGIN_FAILED]
    assert broken.calls == 2
    assert bus.sink_errors == 2
    assert bus.events_emitted == 2
    failures = [r for r in caplog.records if r.name == "sandtrap.events"]
    assert len(failures) == 2
    assert "BrokenSink" in failures[0].getMessage() and SESSION_CONNECT in failures[0].getMessage()
    assert failures[0].exc_info is not None and "disk full" in str(failures[0].exc_info[1])


def test_bus_without_sinks_counts_events() -> None:
    bus = EventBus()
    Emitter(bus, "s", "0123456789ab", "192.0.2.1", 1, "10.0.0.1", 22).emit(SESSION_CONNECT)
    assert (bus.events_emitted, bus.sink_errors) == (1, 0)


def test_capture_sink_filters_by_id() -> None:
    em, sink = emitter()
    em.emit(SESSION_CONNECT)
    em.emit(LOGIN_FAILED, username="a", method="password")
    em.emit(LOGIN_FAILED, username="b", method="password")
    assert [e.get("username") for e in sink.of(LOGIN_FAILED)] == ["a", "b"]
    assert sink.of("cowrie.nothing") == []


def test_event_fields_and_get() -> None:
    em, _ = emitter()
    event: Any = em.emit(LOGIN_FAILED, username="root", method="password", password="x")
    assert event.fields == {"username": "root", "method": "password", "password": "x"}
    assert event.get("src_port") == 50123 and event.get("password") == "x" and event.get("nope", 5) == 5
