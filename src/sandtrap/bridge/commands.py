"""Turn the keystrokes of an interactive shell into the command lines the attacker entered.

A small model of bash's line editor (readline, emacs mode) runs over the input side of the relay:
text is inserted at a cursor; Enter (``\\r``, ``\\n``, ``\\r\\n`` once) ends the line and reports it;
Backspace (DEL, ^H), Delete (``ESC [ 3 ~``), ^D on a non-empty line, ^U, ^K, ^W, Alt-Backspace and
Alt-D edit it; ^A/^E/Home/End, ^B/^F, the left/right arrows and Ctrl- or Alt-arrows, Alt-B/Alt-F
move the cursor; ^C abandons the line; ^D on an empty line (logout) is ignored; up/down (and ^P/^N)
recall the lines entered earlier in this channel, and a recalled line can be edited as in bash
(edits last until the next Enter or ^C). Pasted lines are one command each; bracketed-paste
markers are dropped; other escape sequences and control characters are consumed and ignored.
Lines that are empty or only blanks are not reported.

What this cannot know, because it sees only what the attacker typed and not what the shell did:

- Tab completion: a tab is kept as a literal ``\\t`` in the line; the completed text is only in
  the output (the cast has it).
- Reverse search (^R), history expansion (``!!``, ``!$``), ``fc``, vi mode and custom key bindings:
  the line reported is the keys typed, not the command bash ran.
- Full-screen programs (vim, nano, less, top) get the same keys; their keystrokes come out as odd
  "commands".
- Anything a program reads from the terminal is reported like a command line: the password typed at
  a ``sudo`` or ``passwd`` prompt, answers to ``read``, lines typed into ``cat > file``. Nothing is
  marked as such; the cast shows the prompt each line answered.

Memory and time are bounded: a line keeps at most ``max_line`` characters (the rest is dropped);
history keeps the last ``max_history`` lines and at most ``MAX_HISTORY_CHARS`` characters; after
``4 * max_line`` keys on one line (a pasted run of text counts as one) the rest of that line is
skipped up to the next Enter, so a flood of editing keys costs little. Python still looks at each
control character once (binary noise runs at about 1 MB/s, pasted text at several MB/s), so after
``max_keys`` keys in all the channel is no longer watched (the relay goes on) and ``is_stopped``
is set.
"""

from __future__ import annotations

import codecs
import logging
import re
from collections import deque
from collections.abc import Callable

from sandtrap.sandbox.base import TermSize

log = logging.getLogger(__name__)

MAX_LINE = 64 * 1024
MAX_HISTORY = 1000
MAX_HISTORY_CHARS = 1024 * 1024
MAX_KEYS = 4_000_000  # per channel: hours of typing, thousands of pasted lines; a few seconds of CPU
_MAX_CSI = 16  # parameter characters kept for one control sequence; longer ones are ignored

_LINE_END = re.compile(r"[\r\n]")
# Plain text (no C0/C1 control, no DEL) is inserted as a run; so are runs of backspaces.
_TOKEN = re.compile(r"([^\x00-\x1f\x7f-\x9f]+)|([\x7f\x08]+)|[\s\S]")

_NORMAL, _ESC, _CSI, _SS3 = range(4)


class CommandReconstructor:
    """A :class:`~sandtrap.bridge.proxy.RelayObserver`: ``on_command(line)`` for each line entered."""

    def __init__(
        self,
        on_command: Callable[[str], object],
        max_line: int = MAX_LINE,
        max_history: int = MAX_HISTORY,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self._on_command = on_command
        self._max_line = max_line
        self._max_line_keys = 4 * max_line  # keys (a pasted run counts one) one line may take
        self._max_total_keys = max_keys
        self._keys = 0  # on this line
        self._total_keys = 0
        self.is_stopped = False
        self.commands = 0
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # The line as a gap buffer: text before the cursor, and text after it in reverse order.
        self._left: list[str] = []
        self._right: list[str] = []
        self._history: deque[str] = deque(maxlen=max_history)
        self._history_chars = 0
        self._pos = 0  # index into history; len(history) is the new line being typed
        self._edits: dict[int, str] = {}  # history lines edited since the last Enter, by index
        self._edit_chars = 0
        self._state = _NORMAL
        self._params: list[str] = []
        self._after_cr = False

    # -- what the tests and callers may look at ---------------------------------------------------
    @property
    def line(self) -> str:
        return "".join(self._left) + "".join(reversed(self._right))

    @property
    def cursor(self) -> int:
        return len(self._left)

    @property
    def history(self) -> tuple[str, ...]:
        return tuple(self._history)

    # -- RelayObserver ---------------------------------------------------------------------------
    def on_input(self, data: bytes) -> None:
        if self.is_stopped:
            return
        text = self._decoder.decode(data)
        i, n = 0, len(text)
        while i < n:
            self._keys += 1
            self._total_keys += 1
            if self._total_keys > self._max_total_keys:
                self.is_stopped = True
                log.info("command reconstruction stopped after %d keys", self._max_total_keys)
                return
            if self._keys > self._max_line_keys:
                # No one edits a line with this many keys: skip the noise up to the next Enter.
                end = _LINE_END.search(text, i)
                self._state = _NORMAL
                if end is None:
                    return
                i = end.start()
            if self._state != _NORMAL:
                self._sequence(text[i])
                i += 1
                continue
            m = _TOKEN.match(text, i)
            assert m is not None  # the last branch matches any character
            i = m.end()
            kind = m.lastindex
            if kind == 1:
                self._after_cr = False
                self._insert(m.group(1))
            elif kind == 2:
                self._after_cr = False
                del self._left[len(self._left) - min(i - m.start(), len(self._left)) :]
            else:
                self._control(m.group())

    def on_output(self, data: bytes, stderr: bool) -> None:
        pass

    def on_resize(self, size: TermSize) -> None:
        pass

    # -- the key decoder -------------------------------------------------------------------------
    def _sequence(self, c: str) -> None:
        """One character inside an escape sequence."""
        state, self._state = self._state, _NORMAL
        if state == _ESC:
            if c == "[":
                self._state, self._params = _CSI, []
            elif c == "O":
                self._state = _SS3
            elif c == "\x1b":
                self._state = _ESC
            elif c in "\x7f\x08":
                self._backward_kill_word(whitespace_only=False)  # Alt-Backspace
            elif c >= " ":
                self._meta(c)
            else:
                self._control(c)  # ESC then a control key: the ESC alone is dropped
        elif state == _CSI:
            if "\x20" <= c <= "\x3f":  # parameter and intermediate bytes
                self._state = _CSI
                if len(self._params) < _MAX_CSI:
                    self._params.append(c)
            elif "\x40" <= c <= "\x7e":
                self._csi("".join(self._params), c)
            else:
                self._control(c)  # not part of a sequence: the sequence is dropped, the key counts
        elif "\x40" <= c <= "\x7e":  # SS3
            self._csi("", c)
        else:
            self._control(c)

    def _control(self, c: str) -> None:
        """A control character in plain text (or any character that ended a broken sequence)."""
        after_cr, self._after_cr = self._after_cr, False
        if c == "\r":
            self._after_cr = True
            self._enter()
        elif c == "\n":
            if not after_cr:
                self._enter()
        elif c == "\x1b":
            self._state = _ESC
        elif (key := _KEYS.get(c)) is not None:
            key(self)
        elif not ("\x00" <= c <= "\x1f" or "\x7f" <= c <= "\x9f"):
            self._insert(c)
        # Anything else (^L, ^R, ^Z, C1 controls, ...) is ignored.

    def _csi(self, params: str, final: str) -> None:
        modified = ";" in params  # xterm: ESC [ 1 ; 5 D is Ctrl-Left
        if final == "D" and modified:
            self._backward_word()
        elif final == "D":
            self._left_char()
        elif final == "C" and modified:
            self._forward_word()
        elif final == "C":
            self._right_char()
        elif final == "A":
            self._recall(-1)
        elif final == "B":
            self._recall(+1)
        elif final == "H":
            self._home()
        elif final == "F":
            self._end()
        elif final == "~":
            if params in ("1", "7"):
                self._home()
            elif params in ("4", "8"):
                self._end()
            elif params == "3" and self._right:
                self._right.pop()
            # 200~/201~ (bracketed paste), Insert, PgUp/PgDn, F-keys: nothing to do.

    def _meta(self, c: str) -> None:
        if c == "b":
            self._backward_word()
        elif c == "f":
            self._forward_word()
        elif c == "d":
            while self._right and not self._right[-1].isalnum():
                self._right.pop()
            while self._right and self._right[-1].isalnum():
                self._right.pop()

    # -- editing ---------------------------------------------------------------------------------
    def _insert(self, text: str) -> None:
        room = self._max_line - len(self._left) - len(self._right)
        if room > 0:
            self._left.extend(text[:room])

    def _left_char(self) -> None:
        if self._left:
            self._right.append(self._left.pop())

    def _right_char(self) -> None:
        if self._right:
            self._left.append(self._right.pop())

    def _home(self) -> None:
        self._right.extend(reversed(self._left))
        self._left.clear()

    def _end(self) -> None:
        self._left.extend(reversed(self._right))
        self._right.clear()

    def _backward_word(self) -> None:
        while self._left and not self._left[-1].isalnum():
            self._left_char()
        while self._left and self._left[-1].isalnum():
            self._left_char()

    def _forward_word(self) -> None:
        while self._right and not self._right[-1].isalnum():
            self._right_char()
        while self._right and self._right[-1].isalnum():
            self._right_char()

    def _backward_kill_word(self, whitespace_only: bool) -> None:
        """^W (unix-word-rubout) stops at blanks; Alt-Backspace at any non-alphanumeric."""

        left = self._left
        if whitespace_only:
            while left and left[-1].isspace():
                left.pop()
            while left and not left[-1].isspace():
                left.pop()
        else:
            while left and not left[-1].isalnum():
                left.pop()
            while left and left[-1].isalnum():
                left.pop()

    def _backspace(self) -> None:
        if self._left:
            self._left.pop()

    def _delete_char(self) -> None:
        if self._right:
            self._right.pop()

    def _kill_backward(self) -> None:
        self._left.clear()

    def _kill_forward(self) -> None:
        self._right.clear()

    def _unix_word_rubout(self) -> None:
        self._backward_kill_word(whitespace_only=True)

    def _tab(self) -> None:
        self._insert("\t")

    def _previous(self) -> None:
        self._recall(-1)

    def _next(self) -> None:
        self._recall(+1)

    def _set_line(self, text: str) -> None:
        self._left = list(text)
        self._right = []

    def _recall(self, step: int) -> None:
        target = self._pos + step
        if not 0 <= target <= len(self._history):
            return
        self._keep_edit(self._pos, self.line)
        self._pos = target
        self._set_line(self._edits.get(target, self._history[target] if target < len(self._history) else ""))

    def _keep_edit(self, index: int, text: str) -> None:
        original = self._history[index] if index < len(self._history) else ""
        self._edit_chars -= len(self._edits.pop(index, ""))
        if text == original:
            return
        # The line being typed is always kept; edits to old lines only while they fit the budget.
        if index == len(self._history) or self._edit_chars + len(text) <= MAX_HISTORY_CHARS:
            self._edits[index] = text
            self._edit_chars += len(text)

    def _enter(self) -> None:
        line = self.line
        entered = bool(line.strip())
        if entered:
            self._remember(line)
        self._reset_line()
        if entered:
            self.commands += 1
            self._on_command(line)

    def _remember(self, line: str) -> None:
        history = self._history
        if history.maxlen == 0:
            return
        if history.maxlen is not None and len(history) == history.maxlen:
            self._history_chars -= len(history.popleft())
        while history and self._history_chars + len(line) > MAX_HISTORY_CHARS:
            self._history_chars -= len(history.popleft())
        history.append(line)
        self._history_chars += len(line)

    def _reset_line(self) -> None:
        self._keys = 0
        self._left = []
        self._right = []
        self._edits.clear()
        self._edit_chars = 0
        self._pos = len(self._history)


_KEYS: dict[str, Callable[[CommandReconstructor], None]] = {
    "\t": CommandReconstructor._tab,  # kept literally: what completion did is only in the output
    "\x08": CommandReconstructor._backspace,  # ^H
    "\x7f": CommandReconstructor._backspace,  # DEL
    "\x03": CommandReconstructor._reset_line,  # ^C
    "\x04": CommandReconstructor._delete_char,  # ^D: logout on an empty line, else delete-char
    "\x15": CommandReconstructor._kill_backward,  # ^U
    "\x0b": CommandReconstructor._kill_forward,  # ^K
    "\x17": CommandReconstructor._unix_word_rubout,  # ^W
    "\x01": CommandReconstructor._home,  # ^A
    "\x05": CommandReconstructor._end,  # ^E
    "\x02": CommandReconstructor._left_char,  # ^B
    "\x06": CommandReconstructor._right_char,  # ^F
    "\x10": CommandReconstructor._previous,  # ^P
    "\x0e": CommandReconstructor._next,  # ^N
}
