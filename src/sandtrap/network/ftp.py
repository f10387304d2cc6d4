"""FTP at the gateway (RFC 959): any address's port 21 answers as vsftpd does and takes any login. A passive
data port (PASV/EPSV) is expected (``passive``): the box's connection to it lands on the gateway's
catch-all like any TCP and is handed here. A retrieval asks ``retrieve`` (the gateway: recorded, then
sinkholed or fetched with ``network.egress.fetch``): no bytes is vsftpd's "550 Failed to open file.", bytes are
sent over the data connection as vsftpd sends them. Active mode (PORT/EPRT) is served as vsftpd serves it: the
gateway connects from port 20 of the address the box asked to the box's own port, only to the box that sent the
command (any other address is vsftpd's "500 Illegal PORT command.": no FTP bounce through the gateway), one data
connection per PORT.
"""

from __future__ import annotations

import asyncio
import posixpath
import socket
from collections.abc import Awaitable, Callable

from sandtrap.network.taps import DataChannel

BANNER = b"220 (vsFTPd 3.0.3)\r\n"
MAX_COMMANDS = 200
LINE_LIMIT = 1024
IDLE_S = 60.0

DATA_WAIT_S = 10.0

Record = Callable[[str, str, str], None]  # (user, command, argument) of a store
Retrieve = Callable[[str, str, str], Awaitable[bytes | None]]  # (user, password, path) -> the file, or None
Connect = Callable[[int], Awaitable[DataChannel]]  # active mode: a data connection to this port of the box
Opener = Callable[[], Awaitable[DataChannel]]


def data_socket(source: str) -> socket.socket:
    """Active mode's data socket, made inside the gateway's namespace (where every address is its own): bound to
    ``source`` port 20 as vsftpd's ``connect_from_port_20``, or any port if 20 is taken towards the same box."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((source, 20))
        except OSError:
            sock.bind((source, 0))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def active_port(command: str, argument: str, client: str) -> int | str:
    """The box's data port from PORT (``h1,h2,h3,h4,p1,p2``) or EPRT (``|1|addr|port|``), or vsftpd's refusal:
    malformed, not IPv4, port 0, or an address other than the box's own (``client``: an FTP bounce)."""
    if command == "PORT":
        parts = argument.strip().split(",")
        if len(parts) != 6 or not all(p.isdigit() and len(p) <= 3 and int(p) <= 255 for p in parts):
            return "500 Illegal PORT command.\r\n"
        address, port = ".".join(str(int(p)) for p in parts[:4]), int(parts[4]) * 256 + int(parts[5])
    else:
        fields = argument.strip()
        if len(fields) < 2 or fields[0] != fields[-1] or len(fields.split(fields[0])) != 5:
            return "500 Bad EPRT command.\r\n"
        _, family, address, text, _ = fields.split(fields[0])
        if family != "1":
            return "522 Bad network protocol.\r\n"
        if not text.isdigit() or len(text) > 5:
            return "500 Bad EPRT command.\r\n"
        port = int(text)
    if address != client or not 0 < port < 65536:
        return "500 Illegal PORT command.\r\n"
    return port


def passive_reply(address: str, port: int) -> bytes:
    h = address.replace(".", ",")
    return f"227 Entering Passive Mode ({h},{port >> 8},{port & 0xFF}).\r\n".encode()


def reply(command: str, argument: str, address: str, port: int) -> bytes | None:
    """The answer to one command (None: QUIT, answered and closed by the caller)."""
    simple = {
        "USER": b"331 Please specify the password.\r\n",
        "PASS": b"230 Login successful.\r\n",
        "SYST": b"215 UNIX Type: L8\r\n",
        "TYPE": b"200 Switching to Binary mode.\r\n",
        "PWD": b'257 "/" is the current directory\r\n',
        "CWD": b"250 Directory successfully changed.\r\n",
        "FEAT": b"211-Features:\r\n EPSV\r\n PASV\r\n SIZE\r\n UTF8\r\n211 End\r\n",
        "OPTS": b"200 Always in UTF8 mode.\r\n",
        "PORT": b"200 PORT command successful. Consider using PASV.\r\n",
        "EPRT": b"200 EPRT command successful. Consider using EPSV.\r\n",
        "SIZE": b"550 Could not get file size.\r\n",
        "MDTM": b"550 Could not get file modification time.\r\n",
        "RETR": b"550 Failed to open file.\r\n",
        "STOR": b"553 Could not create file.\r\n",
        "LIST": b"150 Here comes the directory listing.\r\n226 Directory send OK.\r\n",
        "NLST": b"150 Here comes the directory listing.\r\n226 Directory send OK.\r\n",
        "NOOP": b"200 NOOP ok.\r\n",
        "REST": b"350 Restart position accepted (0).\r\n",
    }
    if command == "QUIT":
        return None
    if command == "PASV":
        return passive_reply(address, port)
    if command == "EPSV":
        return f"229 Entering Extended Passive Mode (|||{port}|)\r\n".encode()
    return simple.get(command, b"500 Unknown command.\r\n")


async def serve(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    address: str,
    ports: Callable[[], int],
    passive: Callable[[int], asyncio.Future[DataChannel]],
    retrieve: Retrieve,
    record: Record,
    client: str = "",
    connect: Connect | None = None,
) -> int:
    """One control connection (bounded in commands, line length and idle time); the commands seen.

    ``ports()`` picks a passive port, ``passive(port)`` expects the box's data connection on it; ``connect(port)``
    opens an active-mode one to the box (``client``, its address), None: PORT and EPRT are refused."""
    writer.write(BANNER)
    user = password = ""
    cwd = "/"
    count = 0
    seen: set[str] = set()  # a store is recorded once
    files: dict[str, bytes | None] = {}  # a path is retrieved once (clients ask SIZE, then RETR)
    data: asyncio.Future[DataChannel] | None = None
    target = 0  # active mode: the box's data port from its last PORT/EPRT (one transfer each)
    try:
        while count < MAX_COMMANDS:
            try:
                async with asyncio.timeout(IDLE_S):
                    line = await reader.readuntil(b"\n")
            except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
                break
            count += 1
            text = line[:LINE_LIMIT].decode("latin-1").strip()
            command, _, argument = text.partition(" ")
            command = command.upper()[:8]
            if command == "USER":
                user = argument[:64]
            elif command == "PASS":
                password = argument[:128]
            elif command == "CWD":
                cwd = posixpath.normpath(posixpath.join(cwd, argument[:512]))[:1024]
            path = posixpath.join(cwd, argument[:512])
            port = 0
            if command in ("PASV", "EPSV"):
                if data is not None:
                    release(data)
                port = ports()
                data = passive(port)
                target = 0
            if command in ("PORT", "EPRT"):
                if data is not None:
                    release(data)
                    data = None
                asked = (
                    active_port(command, argument, client) if connect is not None else "500 Illegal PORT command.\r\n"
                )
                if isinstance(asked, str):
                    target = 0
                    writer.write(asked.encode())
                    await writer.drain()
                    continue
                target = asked
            if command in ("RETR", "SIZE") and len(files) < 100 and path not in files:
                files[path] = await retrieve(user, password, path)
            if command == "STOR" and path not in seen and len(seen) < 100:
                seen.add(path)
                record(user, command, path)
            got = files.get(path) if command in ("RETR", "SIZE") else None
            if got is not None and command == "SIZE":
                writer.write(f"213 {len(got)}\r\n".encode())
            elif got is not None and command == "RETR":
                await _send(writer, _opener(data, target, connect), path, got)
                data, target = None, 0
            elif command in ("LIST", "NLST") and target and connect is not None:
                await _empty_listing(writer, connect, target)
                target = 0
            else:
                if command in ("LIST", "NLST", "RETR", "STOR") and data is not None:
                    release(data)  # an empty listing, or no file: the data connection closed unused
                    data = None
                if command in ("RETR", "STOR"):
                    target = 0
                answer = reply(command, argument, address, port)
                if answer is None:
                    writer.write(b"221 Goodbye.\r\n")
                    break
                writer.write(answer)
            await writer.drain()
    finally:
        if data is not None:
            release(data)
    return count


def release(data: asyncio.Future[DataChannel]) -> None:
    """Done with an expected data connection: close it if the box opened it, else expect it no more."""
    if data.done() and not data.cancelled():
        channel = data.result()
        channel.writer.close()
        channel.done.set()
    else:
        data.cancel()


def _opener(data: asyncio.Future[DataChannel] | None, target: int, connect: Connect | None) -> Opener | None:
    """How the next transfer gets its data connection: the box's to the passive port, or ours to its port."""
    if data is not None:
        expected = data

        async def wait() -> DataChannel:
            try:
                return await asyncio.shield(expected)
            except BaseException:
                expected.cancel()
                raise

        return wait
    if target and connect is not None:
        return lambda: connect(target)
    return None


async def _open(opener: Opener) -> DataChannel | None:
    try:
        async with asyncio.timeout(DATA_WAIT_S):
            return await opener()
    except (TimeoutError, OSError):
        return None


async def _empty_listing(writer: asyncio.StreamWriter, connect: Connect, target: int) -> None:
    """An active-mode LIST: the data connection made, nothing listed, closed (vsftpd's empty directory)."""
    channel = await _open(lambda: connect(target))
    if channel is None:
        writer.write(b"425 Failed to establish connection.\r\n")
        return
    writer.write(b"150 Here comes the directory listing.\r\n")
    channel.writer.close()
    channel.done.set()
    writer.write(b"226 Directory send OK.\r\n")


async def _send(writer: asyncio.StreamWriter, opener: Opener | None, path: str, body: bytes) -> None:
    """vsftpd's RETR: 150, the bytes over the data connection, 226 (425 without a data connection)."""
    if opener is None:
        writer.write(b"425 Use PORT or PASV first.\r\n")
        return
    channel = await _open(opener)
    if channel is None:
        writer.write(b"425 Failed to establish connection.\r\n")
        return
    name = posixpath.basename(path)
    writer.write(f"150 Opening BINARY mode data connection for {name} ({len(body)} bytes).\r\n".encode())
    try:
        channel.writer.write(body)
        async with asyncio.timeout(120):
            await channel.writer.drain()
        channel.writer.close()
        writer.write(b"226 Transfer complete.\r\n")
    except (ConnectionError, TimeoutError):
        writer.write(b"426 Failure writing network stream.\r\n")
    finally:
        channel.done.set()
