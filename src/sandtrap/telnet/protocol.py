"""The telnet wire (RFC 854 NVT, RFC 855 option negotiation): a pure, bounded parser and the option state.

:class:`Parser` turns bytes from the client into :data:`Item` s: data, option commands, subnegotiations and
the NVT's other commands. Whatever arrives, its memory is bounded: a subnegotiation longer than
:data:`MAX_SUB` is dropped (and reported once), an ``IAC`` followed by a byte that is no command is reported
and skipped. :class:`Options` answers negotiation as RFC 1143's Q method would (never answering a request
for the state an option is already in, so two peers cannot loop), and stops answering past
:data:`MAX_NEGOTIATIONS` (an option flood is reported, not amplified).

Subnegotiation payloads we use: NAWS (RFC 1073), TERMINAL-TYPE (RFC 1091), NEW-ENVIRON (RFC 1572),
TERMINAL-SPEED (RFC 1079) and X-DISPLAY-LOCATION (RFC 1096).
"""

from __future__ import annotations

from dataclasses import dataclass, field

# -- RFC 854 commands ----------------------------------------------------------------------------------
SE, NOP, DM, BRK, IP, AO, AYT, EC, EL, GA, SB = 240, 241, 242, 243, 244, 245, 246, 247, 248, 249, 250
WILL, WONT, DO, DONT, IAC = 251, 252, 253, 254, 255
EOR = 239
# -- options -------------------------------------------------------------------------------------------
BINARY, ECHO, SGA, STATUS, TM = 0, 1, 3, 5, 6
TTYPE, NAWS, TSPEED, LFLOW, LINEMODE, XDISPLOC, OLD_ENVIRON, NEW_ENVIRON = 24, 31, 32, 33, 34, 35, 36, 39
IS, SEND, INFO = 0, 1, 2
VAR, VALUE, ESC, USERVAR = 0, 1, 2, 3

OPTION_NAMES = {
    BINARY: "BINARY", ECHO: "ECHO", SGA: "SGA", STATUS: "STATUS", TM: "TIMING-MARK", TTYPE: "TTYPE",
    NAWS: "NAWS", TSPEED: "TSPEED", LFLOW: "LFLOW", LINEMODE: "LINEMODE", XDISPLOC: "XDISPLOC",
    OLD_ENVIRON: "OLD-ENVIRON", NEW_ENVIRON: "NEW-ENVIRON", 37: "AUTHENTICATION", 38: "ENCRYPT",
}  # fmt: skip

MAX_SUB = 1024  # a subnegotiation's payload; NAWS is 4 bytes, a terminal type 40, an environment a few hundred
MAX_NEGOTIATIONS = 256  # option commands answered per connection; a client sends about ten
MAX_ENV_VARS = 64


def option_name(opt: int) -> str:
    return OPTION_NAMES.get(opt, str(opt))


@dataclass(frozen=True, slots=True)
class Data:
    data: bytes


@dataclass(frozen=True, slots=True)
class Command:
    """WILL, WONT, DO or DONT ``option``."""

    verb: int
    option: int


@dataclass(frozen=True, slots=True)
class Sub:
    """A complete subnegotiation: ``IAC SB option payload IAC SE`` (``IAC IAC`` in it undoubled)."""

    option: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Signal:
    """One of the NVT's other commands: IP, AYT, BRK, EC, EL, AO, NOP, GA, DM, EOR."""

    command: int


@dataclass(frozen=True, slots=True)
class Anomaly:
    """What the client sent that a telnet client would not: ``sub_overflow``, ``bad_command``, ``sub_unterminated``."""

    kind: str
    detail: str = ""


Item = Data | Command | Sub | Signal | Anomaly

_DATA, _IAC, _VERB, _SB_OPT, _SB, _SB_IAC, _SKIP_SB, _SKIP_SB_IAC = range(8)
_VERBS = (WILL, WONT, DO, DONT)
_SIGNALS = (NOP, DM, BRK, IP, AO, AYT, EC, EL, GA, EOR)


@dataclass
class Parser:
    """Client bytes -> items. ``crlf``: map CR LF and CR NUL to CR (what telnetd hands the pty in NVT mode)."""

    crlf: bool = True
    _state: int = _DATA
    _verb: int = 0
    _opt: int = 0
    _sub: bytearray = field(default_factory=bytearray)
    _after_cr: bool = False

    def feed(self, data: bytes) -> list[Item]:
        out: list[Item] = []
        buf = bytearray()

        def flush() -> None:
            if buf:
                out.append(Data(bytes(buf)))
                buf.clear()

        for b in data:
            st = self._state
            if st == _DATA:
                if b == IAC:
                    self._state = _IAC
                    continue
                if self._after_cr:
                    self._after_cr = False
                    if b in (0, 10):  # CR NUL / CR LF: the CR alone
                        continue
                buf.append(b)
                if b == 13 and self.crlf:
                    self._after_cr = True
            elif st == _IAC:
                self._after_cr = False
                if b == IAC:  # a data byte 255
                    buf.append(IAC)
                    self._state = _DATA
                elif b in _VERBS:
                    self._verb, self._state = b, _VERB
                elif b == SB:
                    self._state = _SB_OPT
                elif b in _SIGNALS:
                    flush()
                    out.append(Signal(b))
                    self._state = _DATA
                else:  # SE outside a subnegotiation, or no command at all
                    flush()
                    out.append(Anomaly("bad_command", f"IAC {b}"))
                    self._state = _DATA
            elif st == _VERB:
                flush()
                out.append(Command(self._verb, b))
                self._state = _DATA
            elif st == _SB_OPT:
                self._opt, self._state = b, _SB
                self._sub.clear()
            elif st == _SB:
                if b == IAC:
                    self._state = _SB_IAC
                elif len(self._sub) >= MAX_SUB:
                    flush()
                    out.append(Anomaly("sub_overflow", f"{option_name(self._opt)} past {MAX_SUB} bytes"))
                    self._sub.clear()
                    self._state = _SKIP_SB
                else:
                    self._sub.append(b)
            elif st == _SB_IAC:
                if b == SE:
                    flush()
                    out.append(Sub(self._opt, bytes(self._sub)))
                    self._sub.clear()
                    self._state = _DATA
                elif b == IAC:
                    self._state = _SB
                    if len(self._sub) < MAX_SUB:
                        self._sub.append(IAC)
                else:
                    # RFC 855 allows no other command inside SB: the subnegotiation ends here unterminated.
                    flush()
                    out.append(Anomaly("sub_unterminated", f"{option_name(self._opt)}: IAC {b} inside SB"))
                    self._sub.clear()
                    self._state = _DATA
            elif st == _SKIP_SB:
                if b == IAC:
                    self._state = _SKIP_SB_IAC
            else:  # _SKIP_SB_IAC
                self._state = _DATA if b == SE else _SKIP_SB
        flush()
        return out

    @property
    def buffered(self) -> int:
        """Bytes held between calls (bounded by MAX_SUB)."""
        return len(self._sub)


def escape(data: bytes) -> bytes:
    """Data to the client: a 255 byte doubled (RFC 854)."""
    return data.replace(b"\xff", b"\xff\xff")


def command(verb: int, opt: int) -> bytes:
    return bytes((IAC, verb, opt))


def sub(opt: int, payload: bytes) -> bytes:
    return bytes((IAC, SB, opt)) + escape(payload) + bytes((IAC, SE))


# -- the options' state (RFC 1143, without the queue bit: we never ask twice) ---------------------------


@dataclass
class Options:
    """Which options are on, on each side, and what to answer to the client's commands.

    ``ours``: options the server will enable on its side when asked (WILL); ``theirs``: options it wants
    the client to enable (DO)."""

    ours: frozenset[int] = frozenset({ECHO, SGA, BINARY})
    theirs: frozenset[int] = frozenset({TTYPE, NAWS, NEW_ENVIRON, TSPEED, XDISPLOC, LFLOW, BINARY})
    us: set[int] = field(default_factory=set)  # enabled on our side
    him: set[int] = field(default_factory=set)  # enabled on the client's side
    asked_us: set[int] = field(default_factory=set)  # we sent WILL, no answer yet
    asked_him: set[int] = field(default_factory=set)  # we sent DO, no answer yet
    refused_us: set[int] = field(default_factory=set)  # our options we said WONT to (once)
    refused_him: set[int] = field(default_factory=set)  # the client's options we said DONT to, or it refused
    answered: int = 0
    flooded: bool = False

    def will(self, opt: int) -> bytes:
        """Offer an option of ours (sends WILL unless on or asked)."""
        if opt in self.us or opt in self.asked_us:
            return b""
        self.asked_us.add(opt)
        return command(WILL, opt)

    def do(self, opt: int) -> bytes:
        """Ask the client to enable an option (sends DO unless on or asked)."""
        if opt in self.him or opt in self.asked_him:
            return b""
        self.asked_him.add(opt)
        return command(DO, opt)

    def receive(self, cmd: Command) -> tuple[bytes, bool]:
        """The answer to the client's command (maybe none) and whether the option's state changed."""
        self.answered += 1
        if self.answered > MAX_NEGOTIATIONS:
            self.flooded = True
            return b"", False
        verb, opt = cmd.verb, cmd.option
        if verb == WILL:
            if opt in self.him:
                return b"", False
            if opt in self.theirs:
                answer = b"" if opt in self.asked_him else command(DO, opt)
                self.asked_him.discard(opt)
                self.him.add(opt)
                return answer, True
            if opt in self.refused_him:
                return b"", False
            self.refused_him.add(opt)
            return command(DONT, opt), False
        if verb == WONT:
            if opt in self.him:
                self.him.discard(opt)
                return command(DONT, opt), True
            if opt in self.asked_him:  # our DO refused: nothing to answer
                self.asked_him.discard(opt)
                self.refused_him.add(opt)
                return b"", True
            return b"", False
        if verb == DO:
            if opt in self.us:
                return b"", False
            if opt in self.ours:
                answer = b"" if opt in self.asked_us else command(WILL, opt)
                self.asked_us.discard(opt)
                self.us.add(opt)
                return answer, True
            if opt == TM:  # TIMING-MARK: answered every time, never on (RFC 860)
                return command(WONT, opt), False
            if opt in self.refused_us:
                return b"", False
            self.refused_us.add(opt)
            return command(WONT, opt), False
        # DONT
        if opt in self.us:
            self.us.discard(opt)
            return command(WONT, opt), True
        self.asked_us.discard(opt)
        return b"", False


# -- subnegotiation payloads -----------------------------------------------------------------------------


def parse_naws(payload: bytes) -> tuple[int, int] | None:
    """RFC 1073: width and height, 16 bits each (0: unknown)."""
    if len(payload) != 4:
        return None
    return int.from_bytes(payload[:2], "big"), int.from_bytes(payload[2:], "big")


def parse_is_text(payload: bytes, limit: int = 256) -> str | None:
    """``IS text`` (TTYPE, TSPEED, XDISPLOC), printable ASCII only, bounded."""
    if not payload or payload[0] != IS:
        return None
    text = payload[1 : 1 + limit].decode("ascii", "replace")
    return "".join(c for c in text if c.isprintable())


def parse_environ(payload: bytes) -> dict[str, str]:
    """RFC 1572 ``IS``/``INFO`` lists: VAR/USERVAR name [VALUE value], ESC quoting the next byte."""
    if not payload or payload[0] not in (IS, INFO):
        return {}
    out: dict[str, str] = {}
    name: bytearray | None = None
    value: bytearray | None = None
    cur: bytearray | None = None
    i = 1

    def done() -> None:
        if name is not None and len(out) < MAX_ENV_VARS:
            out[name.decode("utf-8", "replace")[:256]] = (value or bytearray()).decode("utf-8", "replace")[:1024]

    while i < len(payload):
        b = payload[i]
        if b in (VAR, USERVAR):
            done()
            name, value = bytearray(), None
            cur = name
        elif b == VALUE:
            if name is not None:
                value = bytearray()
                cur = value
            else:
                cur = None
        elif b == ESC and i + 1 < len(payload):
            i += 1
            if cur is not None:
                cur.append(payload[i])
        elif cur is not None:
            cur.append(b)
        i += 1
    done()
    return out
