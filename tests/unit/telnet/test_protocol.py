"""The telnet parser and option state: pure, bounded, and never looping (RFC 854/855/1073/1091/1143/1572)."""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from sandtrap.telnet import protocol as tp
from sandtrap.telnet.protocol import Anomaly, Command, Data, Options, Parser, Signal, Sub

IAC, SB, SE = tp.IAC, tp.SB, tp.SE


def data_of(items: list[tp.Item]) -> bytes:
    return b"".join(i.data for i in items if isinstance(i, Data))


def test_commands_subnegotiations_and_data_split_anywhere() -> None:
    wire = (
        b"ab" + bytes([IAC, tp.WILL, tp.TTYPE]) + b"c" + bytes([IAC, IAC])
        + bytes([IAC, SB, tp.NAWS, 0, 80, 0, 24, IAC, SE]) + bytes([IAC, tp.AYT]) + b"d\r\n"
    )  # fmt: skip
    whole = Parser().feed(wire)
    assert Command(tp.WILL, tp.TTYPE) in whole and Sub(tp.NAWS, bytes([0, 80, 0, 24])) in whole
    assert Signal(tp.AYT) in whole
    assert data_of(whole) == b"abc\xffd\r"  # IAC IAC is a 255; CR LF is CR (telnetd's NVT mapping)
    for cut in range(len(wire)):
        p = Parser()
        items = p.feed(wire[:cut]) + p.feed(wire[cut:])
        assert data_of(items) == data_of(whole)
        assert [i for i in items if not isinstance(i, Data)] == [i for i in whole if not isinstance(i, Data)]


def test_cr_nul_is_cr_and_binary_keeps_bytes() -> None:
    assert data_of(Parser().feed(b"a\r\0b\r\nc")) == b"a\rb\rc"
    assert data_of(Parser(crlf=False).feed(b"a\r\0b\r\nc")) == b"a\r\0b\r\nc"


def test_iac_iac_inside_a_subnegotiation_is_one_byte() -> None:
    items = Parser().feed(bytes([IAC, SB, tp.NAWS, 0, IAC, IAC, 0, 24, IAC, SE]))
    assert items == [Sub(tp.NAWS, bytes([0, 255, 0, 24]))]
    assert tp.parse_naws(bytes([0, 255, 0, 24])) == (255, 24)


def test_subnegotiation_overflow_is_dropped_reported_once_and_parsing_goes_on() -> None:
    p = Parser()
    items = p.feed(bytes([IAC, SB, tp.TTYPE]) + b"x" * (10 * tp.MAX_SUB))
    assert items == [Anomaly("sub_overflow", f"TTYPE past {tp.MAX_SUB} bytes")]
    assert p.buffered == 0
    more = p.feed(b"y" * 100_000 + bytes([IAC, SE]) + b"hello")
    assert data_of(more) == b"hello" and p.buffered == 0


def test_bad_command_and_unterminated_sub_are_anomalies() -> None:
    items = Parser().feed(bytes([IAC, 7]) + b"a" + bytes([IAC, SB, tp.TTYPE, 0, IAC, tp.WILL]) + b"b")
    kinds = [i.kind for i in items if isinstance(i, Anomaly)]
    assert kinds == ["bad_command", "sub_unterminated"]
    assert data_of(items) == b"ab"


def test_options_never_answer_a_request_for_the_current_state() -> None:
    o = Options()
    assert o.do(tp.TTYPE) == bytes([IAC, tp.DO, tp.TTYPE])
    assert o.do(tp.TTYPE) == b""  # asked already
    assert o.receive(Command(tp.WILL, tp.TTYPE)) == (b"", True)  # the answer to our DO: no reply
    assert o.receive(Command(tp.WILL, tp.TTYPE)) == (b"", False)
    assert o.receive(Command(tp.DO, tp.ECHO)) == (bytes([IAC, tp.WILL, tp.ECHO]), True)
    assert o.receive(Command(tp.DO, tp.ECHO)) == (b"", False)
    assert o.receive(Command(tp.DO, 99)) == (bytes([IAC, tp.WONT, 99]), False)
    assert o.receive(Command(tp.DO, 99)) == (b"", False)  # refused once; a repeat gets nothing
    assert o.receive(Command(tp.WILL, 99)) == (bytes([IAC, tp.DONT, 99]), False)
    assert o.receive(Command(tp.DONT, tp.ECHO)) == (bytes([IAC, tp.WONT, tp.ECHO]), True)


def test_option_flood_stops_being_answered() -> None:
    o = Options()
    answers = b""
    for i in range(10_000):
        answer, _ = o.receive(Command(tp.DO if i % 2 else tp.DONT, tp.ECHO))
        answers += answer
    assert o.flooded
    assert len(answers) <= 3 * tp.MAX_NEGOTIATIONS


def test_environ_and_ttype() -> None:
    payload = bytes([tp.IS, tp.VAR]) + b"USER" + bytes([tp.VALUE]) + b"root" + bytes([tp.USERVAR]) + b"X"
    payload += bytes([tp.VALUE, tp.ESC, 1]) + b"y" + bytes([tp.VAR]) + b"DISPLAY"
    assert tp.parse_environ(payload) == {"USER": "root", "X": "\x01y", "DISPLAY": ""}
    assert tp.parse_environ(bytes([tp.SEND])) == {}
    assert tp.parse_is_text(bytes([tp.IS]) + b"XTERM-256COLOR") == "XTERM-256COLOR"
    assert tp.parse_is_text(bytes([tp.SEND])) is None
    many = bytes([tp.IS]) + b"".join(bytes([tp.VAR]) + b"V%d" % i for i in range(1000))
    assert len(tp.parse_environ(many)) == tp.MAX_ENV_VARS


def test_escape_doubles_iac() -> None:
    assert tp.escape(b"a\xffb") == b"a\xff\xffb"
    assert tp.sub(tp.TTYPE, bytes([tp.SEND])) == bytes([IAC, SB, tp.TTYPE, tp.SEND, IAC, SE])


# -- fuzz: whatever arrives, the parser neither raises nor holds more than MAX_SUB, and data survives --


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=20))
def test_fuzz_any_bytes_in_any_chunks(chunks: list[bytes]) -> None:
    p, o = Parser(), Options()
    for chunk in chunks:
        for item in p.feed(chunk):
            if isinstance(item, Command):
                o.receive(item)
            elif isinstance(item, Sub):
                assert len(item.payload) <= tp.MAX_SUB
                tp.parse_naws(item.payload)
                tp.parse_is_text(item.payload)
                tp.parse_environ(item.payload)
        assert p.buffered <= tp.MAX_SUB


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000), st.integers(min_value=0, max_value=2000))
def test_fuzz_plain_data_round_trips_through_escape(data: bytes, cut: int) -> None:
    """Data without CR, escaped as a server sends it, parses back to itself, split anywhere."""
    data = data.replace(b"\r", b"")
    wire = tp.escape(data)
    p = Parser()
    assert data_of(p.feed(wire[:cut]) + p.feed(wire[cut:])) == data


def test_seeded_random_garbage_megabytes() -> None:
    rng = random.Random(17)
    p, o = Parser(), Options()
    for _ in range(200):
        chunk = bytes(rng.choice((IAC, SB, SE, tp.WILL, tp.DO, 0, 13, 10, rng.randrange(256))) for _ in range(5000))
        for item in p.feed(chunk):
            if isinstance(item, Command):
                o.receive(item)
        assert p.buffered <= tp.MAX_SUB
