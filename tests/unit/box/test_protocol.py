"""Both sides of the host<->box protocol against its one description (box/PROTOCOL.md, sandbox/host/boxwire.py).

The host side is boxwire.py itself; the box side is protocol.h (generated from it, checked current here) and
wire.c, compiled with gcc and fed what the host's encoder writes, its replies read by the host's parser.
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from sandtrap.sandbox.base import ExitStatus, TermSize
from sandtrap.sandbox.host import boxwire
from sandtrap.sandbox.host.boxwire import (
    MAX_REQUEST,
    MAX_STRINGS,
    BrokerError,
    Exited,
    Failed,
    Started,
    encode_request,
    encode_signal,
    parse_reply,
)

BOX = Path(boxwire.__file__).resolve().parents[2] / "box"
HARNESS = Path(__file__).with_name("wire_harness.c")


# --- one description ----------------------------------------------------------------------------------------


def test_protocol_h_is_generated_from_boxwire() -> None:
    assert (BOX / "protocol.h").read_text() == boxwire.c_header(), (
        "box/protocol.h is stale: python -m sandtrap.sandbox.host.boxwire > src/sandtrap/box/protocol.h"
    )


def test_protocol_md_names_the_same_constants() -> None:
    text = (BOX / "PROTOCOL.md").read_text()
    table = text[text.index("## Constants") :]
    documented = dict(re.findall(r"^\| `(\w+)` \| `([^`]+)` \|", table, re.MULTILINE))
    assert documented == {name: boxwire._c_literal(value) for name, value in boxwire.CONSTANTS}


def test_the_header_matches_the_python_layout() -> None:
    values = dict(boxwire.CONSTANTS)
    assert values["REQUEST_HEADER_SIZE"] == boxwire.HEADER.size == 13
    assert boxwire.SOCKET_NAME == b"\0" + str(values["BOX_SOCKET"]).encode()
    packed = boxwire.HEADER.pack(b"STB1", 0xA1, 0xB2C3, 0xD4E5, 0xF607, 0x0819)
    assert packed[int(values["REQUEST_FLAGS_AT"])] == 0xA1
    for name, value in (("COLS", 0xB2C3), ("ROWS", 0xD4E5), ("ARGC", 0xF607), ("ENVC", 0x0819)):
        at = int(values[f"REQUEST_{name}_AT"])
        assert struct.unpack_from("<H", packed, at)[0] == value
    # The host waits for the start longer than the box's worker waits for the relay's connection.
    assert boxwire.RELAY_WAIT_MS < 1000 * 5.0


def _code(path: Path) -> str:
    """A C file without its comments."""
    return re.sub(r"/\*.*?\*/|//[^\n]*", "", path.read_text(), flags=re.DOTALL)


@pytest.mark.parametrize("name", ["init.c", "listener.c", "relay.c", "wire.c", "relay.h", "wire.h", "listener.h"])
def test_the_box_spells_no_protocol_constant_itself(name: str) -> None:
    code = _code(BOX / name)
    for const, value in boxwire.CONSTANTS:
        if isinstance(value, bytes):
            assert f"'{value.decode()}'" not in code, f"{name} spells {const} as a literal"
        elif isinstance(value, str):
            assert f'"{value}"' not in code, f"{name} spells {const} as a literal"
        assert not re.search(rf"#define\s+{const}\b", code), f"{name} defines {const} again"


# --- the box's parser and encoder, compiled -----------------------------------------------------------------


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Path:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("gcc is needed to compile the box's wire.c")
    exe = tmp_path_factory.mktemp("wire") / "harness"
    subprocess.run(
        [
            gcc,
            "-std=gnu11",
            "-Wall",
            "-Wextra",
            "-Werror",
            "-I",
            str(BOX),
            "-o",
            str(exe),
            str(HARNESS),
            str(BOX / "wire.c"),
        ],
        check=True,
        capture_output=True,
    )
    return exe


def box(harness: Path, *args: str, stdin: bytes = b"") -> list[tuple[str, str]]:
    out = subprocess.run([str(harness), *args], input=stdin, capture_output=True, check=True, timeout=10).stdout
    return [tuple(line.split(" ", 1)) if " " in line else (line, "") for line in out.decode().splitlines()]  # type: ignore[misc]


def as_box_reads(packet: bytes, harness: Path) -> dict[str, object]:
    fields: dict[str, object] = {"argv": [], "env": []}
    for key, value in box(harness, "request", stdin=packet):
        if key in ("argv", "env"):
            fields[key].append(bytes.fromhex(value))  # type: ignore[attr-defined]
        elif key in ("user", "workdir", "peer"):
            fields[key] = bytes.fromhex(value)
        else:
            fields[key] = value if key == "refused" else int(value)
    return fields


@pytest.mark.parametrize(
    ("argv", "env", "user", "workdir", "tty", "peer"),
    [
        (["/usr/bin/env", "-i", "A=1"], {"TERM": "xterm"}, "root", "/root", TermSize(132, 43), None),
        (["printf", "caf\udce9", ""], {}, "", "", None, None),
        (["sh"], {"A": "1", "B": "=x="}, "admin", "", None, "127.0.0.2 50627"),
        (["bash", "-l"], {"LANG": "C.UTF-8"}, "root", "/", TermSize(0xFFFF, 1), "2001:db8::7 1"),
        ([b"\xff\xfe", b"-c"], {}, "root", "", TermSize(80, 24), None),
        (["x"] * 200, {f"V{i}": str(i) for i in range(MAX_STRINGS - 200)}, "root", "", None, None),
        (["sh", "-c", "y" * (MAX_REQUEST - 64)], {}, "root", "", None, None),
    ],
)
def test_the_box_reads_what_the_host_sends(
    harness: Path,
    argv: list[str | bytes],
    env: dict[str, str],
    user: str,
    workdir: str,
    tty: TermSize | None,
    peer: str | None,
) -> None:
    packet = encode_request(argv, env, user, workdir, tty, peer)
    got = as_box_reads(packet, harness)
    enc = [a if isinstance(a, bytes) else a.encode("utf-8", "surrogateescape") for a in argv]
    want: dict[str, object] = {
        "tty": 1 if tty else 0,
        "relay": 1 if peer is not None else 0,
        "cols": tty.cols if tty else 0,
        "rows": tty.rows if tty else 0,
        "argc": len(argv),
        "envc": len(env),
        "user": user.encode(),
        "workdir": workdir.encode(),
        "argv": enc,
        "env": [f"{k}={v}".encode() for k, v in env.items()],
        "terminated": 1,
    }
    if peer is not None:
        want["peer"] = peer.encode()
    assert got == want


def _raw(flags: int, argc: int, envc: int, strings: list[bytes], magic: bytes = b"STB1") -> bytes:
    return boxwire.HEADER.pack(magic, flags, 80, 24, argc, envc) + b"".join(s + b"\0" for s in strings)


@pytest.mark.parametrize(
    ("packet", "why"),
    [
        (b"", "bad request"),
        (b"STB1", "bad request"),
        (_raw(0, 1, 0, [b"root", b"", b"sh"], magic=b"STB0"), "bad request"),
        (_raw(0, 1, 0, [b"root", b"", b"sh"]) + b"x" * MAX_REQUEST, "bad request"),  # over MAX_REQUEST
        (_raw(0, 0, 0, [b"root", b""]), "bad counts"),
        (_raw(0, MAX_STRINGS, 1, [b"root", b""] + [b"x"] * (MAX_STRINGS + 1)), "bad counts"),
        (_raw(0, 2, 0, [b"root", b"", b"sh"]), "bad strings"),  # a string missing
        (_raw(0, 1, 0, [b"root", b"", b"sh", b"extra"]), "bad strings"),  # one too many
        (_raw(0, 1, 0, [b"root", b"", b"sh"]) + b"tail", "bad strings"),  # not NUL-terminated
        (_raw(2, 1, 0, [b"root", b"", b"sh"]), "bad strings"),  # flag 2 without its peer
    ],
)
def test_the_box_refuses_what_the_host_never_sends(harness: Path, packet: bytes, why: str) -> None:
    assert as_box_reads(packet, harness).get("refused") == why


@pytest.mark.parametrize("pid", [1, 812, (1 << 22) - 1])
def test_started_as_the_host_reads_it(harness: Path, pid: int) -> None:
    [(_, reply)] = box(harness, "started", str(pid))
    assert parse_reply(bytes.fromhex(reply)) == Started(pid)


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (0, ExitStatus(0)),
        (3 << 8, ExitStatus(3)),
        (255 << 8, ExitStatus(255)),
        (9, ExitStatus(137, "KILL")),  # killed by SIGKILL
        (15 | 0x80, ExitStatus(143, "TERM")),  # by SIGTERM, with a core dump
        (143 << 8, ExitStatus(143, "TERM")),  # the session helper's 128+N
        (0x137F, ExitStatus(255)),  # "stopped": not trusted
    ],
)
def test_exited_as_the_host_reads_it(harness: Path, status: int, expected: ExitStatus) -> None:
    [(_, reply)] = box(harness, "exited", str(status))
    assert parse_reply(bytes.fromhex(reply)) == Exited(expected)


@pytest.mark.parametrize("why", ["bad request", "unknown user", "x" * 300])
def test_failed_as_the_host_reads_it(harness: Path, why: str) -> None:
    [(_, reply)] = box(harness, "failed", why)
    data = bytes.fromhex(reply)
    assert len(data) < boxwire.MAX_FAILED_TEXT
    assert parse_reply(data) == Failed(why[: boxwire.MAX_FAILED_TEXT - 2])


def test_signals_as_the_box_reads_them(harness: Path) -> None:
    for signum in range(1, boxwire.MAX_SIGNAL + 1):
        assert box(harness, "signal", encode_signal(signum).hex()) == [("signal", str(signum))]
    for data in (b"K\0", b"K\x20", b"K", b"K\x01\x01", b"X\x01"):
        assert box(harness, "signal", data.hex()) == [("signal", "0")]
    for signum in (0, boxwire.MAX_SIGNAL + 1):
        with pytest.raises(BrokerError):
            encode_signal(signum)
