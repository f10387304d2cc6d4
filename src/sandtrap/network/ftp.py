"""FTP at the gateway (RFC 959), a sinkhole: any address's port 21 answers as vsftpd does, takes any login,
offers a passive data port (which lands on the gateway's catch-all like any TCP) or accepts an active one,
and answers every retrieval "550 Failed to open file." after recording it. Never fetched.
"""

from __future__ import annotations

import asyncio
import posixpath
from collections.abc import Callable

BANNER = b"220 (vsFTPd 3.0.3)\r\n"
MAX_COMMANDS = 200
LINE_LIMIT = 1024
IDLE_S = 60.0

Record = Callable[[str, str, str], None]  # (user, command, argument) of a retrieval or store


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
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str, data_port: int, record: Record
) -> int:
    """One control connection (bounded in commands, line length and idle time); the commands seen."""
    writer.write(BANNER)
    user = ""
    cwd = "/"
    count = 0
    seen: set[str] = set()  # a path is recorded once (clients ask SIZE, then RETR)
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
        elif command == "CWD":
            cwd = posixpath.normpath(posixpath.join(cwd, argument[:512]))[:1024]
        path = posixpath.join(cwd, argument[:512])
        if command in ("RETR", "STOR", "SIZE") and path not in seen and len(seen) < 100:
            seen.add(path)
            record(user, command, path)
        answer = reply(command, argument, address, data_port)
        if answer is None:
            writer.write(b"221 Goodbye.\r\n")
            break
        writer.write(answer)
        await writer.drain()
    return count
