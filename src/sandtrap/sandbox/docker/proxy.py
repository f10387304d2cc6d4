"""An allow-list proxy in front of the Docker engine: least privilege for the honeypot itself.

Whoever holds the engine's socket is root on the host (one privileged container with ``/``
bind-mounted is enough). In proxy mode the honeypot is pointed at this proxy instead
(``sandbox.docker.docker_host: unix:///run/sandtrap/engine.sock``) and only the proxy holds the real socket.
The proxy lets through the calls :class:`~sandtrap.sandbox.docker.DockerBackend` and the image check
make (``proxy_policy.ROUTES``, nothing else), reads every container-create and exec-create body and
refuses what would weaken a sandbox (:mod:`sandtrap.sandbox.docker.proxy_policy`), and, with a sensor name,
touches only containers labelled for that sensor. Anything else gets 403 with a JSON ``message``, worded as
the engine words its own errors, so the client raises its usual error.

Every request gets its own engine connection, sent with ``Connection: close``: the proxy never has to
find where one answer ends and the next request begins. Exec start is the one upgrade: after the
allow decision the bytes are spliced both ways, half-closes passed on (stdin EOF).

Run: ``python -m sandtrap.sandbox.docker.proxy --listen /run/sandtrap/engine.sock --config sandtrap.yaml``
(SECURITY.md, "Engine proxy").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import grp
import json
import logging
import os
import signal
import socket
import stat
import sys
from collections import Counter, OrderedDict, deque
from pathlib import Path
from typing import Any

from sandtrap.config import load_settings
from sandtrap.errors import ConfigError
from sandtrap.sandbox.docker.proxy_policy import (
    MAX_BODY,
    MAX_HEAD,
    Policy,
    Refused,
    Request,
    Route,
    check_create,
    check_exec,
    check_list,
    check_network_create,
    match,
    parse_head,
)

log = logging.getLogger(__name__)

HEAD_TIMEOUT_S = 30.0
LOOKUP_TIMEOUT_S = 10.0
MAX_LOOKUP_BYTES = 4 * 1024 * 1024
CACHE_SIZE = 4096
_REASONS = {
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    413: "Payload Too Large",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "proxy-authorization"}


def error_response(status: int, message: str) -> bytes:
    """An answer the engine's clients understand: JSON with ``message`` (aiodocker, docker-py, the CLI)."""
    body = json.dumps({"message": message}).encode()
    head = (
        f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body


class EngineProxy:
    """Listens on a unix socket; forwards allowed engine calls to ``upstream``, refuses the rest."""

    def __init__(
        self, listen: Path, upstream: Path, policy: Policy, mode: int = 0o660, group: str | None = None
    ) -> None:
        self.listen = listen
        self.upstream = upstream
        self.policy = policy
        self._mode = mode
        self._group = group
        self._server: asyncio.Server | None = None
        self._inode = -1
        self._owned: OrderedDict[str, str] = OrderedDict()  # container or exec id -> container id, both allowed
        self._handlers: set[asyncio.Task[None]] = set()
        self.allowed: Counter[str] = Counter()  # route name -> requests let through
        self.refused: deque[tuple[str, str, int, str]] = deque(maxlen=1000)  # method, path, status, reason

    async def start(self) -> None:
        if self.listen.exists() or self.listen.is_symlink():
            if not stat.S_ISSOCK(self.listen.lstat().st_mode):
                raise ConfigError(f"engine proxy: {self.listen} exists and is not a socket")
            self.listen.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.listen))
            # Permissions before listen(): until then nobody can connect, so there is no window.
            os.chmod(self.listen, self._mode)
            self._inode = self.listen.lstat().st_ino
            if self._group:
                os.chown(self.listen, -1, grp.getgrnam(self._group).gr_gid)
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        self._server = await asyncio.start_unix_server(self._serve, sock=sock, limit=MAX_HEAD)
        log.info("engine proxy on %s -> %s (sensor %r)", self.listen, self.upstream, self.policy.sensor)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._handlers):
                task.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(OSError):
            if self.listen.lstat().st_ino == self._inode:  # still ours, not a successor's
                self.listen.unlink()

    async def __aenter__(self) -> EngineProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def serve_forever(self) -> None:
        assert self._server is not None
        await self._server.serve_forever()

    # -- one client connection: one request ------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._one(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            log.debug("engine proxy: connection ended: %r", exc)
        except Exception:  # one connection is one failure domain: the proxy serves on
            log.exception("engine proxy: request failed")
        finally:
            self._handlers.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        req: Request | None = None
        try:
            try:
                async with asyncio.timeout(HEAD_TIMEOUT_S):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                raise Refused(431, f"request head larger than {MAX_HEAD} bytes") from None
            except TimeoutError:
                raise Refused(400, "request head not received in time") from None
            except asyncio.IncompleteReadError:
                return  # the client went away before asking anything
            req = parse_head(head)
            route = match(req)
            body = await self._read_body(reader, req) if route.body != "none" else None
            target = await self._decide(req, route, body)
            try:
                up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream), limit=2**16)
            except OSError as exc:
                raise Refused(502, f"engine proxy: engine unreachable: {exc}") from None
        except Refused as exc:
            method, path = (req.method, req.path) if req else ("?", "?")
            log.warning("engine proxy refused %s %r: %s", method, path, exc.message)
            self.refused.append((method, path, exc.status, exc.message))
            writer.write(error_response(exc.status, exc.message))
            await writer.drain()
            await discard(reader)
            return
        self.allowed[route.name] += 1
        log.debug("engine proxy: %s %s (%s)", req.method, req.path, route.name)
        try:
            up_writer.write(forward_head(req, target, body, upgrade=route.upgrade))
            if body is not None:
                up_writer.write(body)
            await up_writer.drain()
            await splice(reader, writer, up_reader, up_writer)
        finally:
            up_writer.close()

    async def _read_body(self, reader: asyncio.StreamReader, req: Request) -> bytes:
        """The whole (small) body of a request the policy must read: Content-Length or chunked."""
        try:
            async with asyncio.timeout(HEAD_TIMEOUT_S):
                return await _read_body(reader, req)
        except (TimeoutError, ValueError, asyncio.LimitOverrunError, asyncio.IncompleteReadError):
            raise Refused(400, "request body incomplete or malformed") from None

    async def _decide(self, req: Request, route: Route, body: bytes | None) -> str:
        """Refuse, or return the request target to send (ids resolved, so a rename cannot swap them)."""
        policy = self.policy
        if route.body == "create":
            check_create(body or b"", policy)
        elif route.body == "exec":
            check_exec(body or b"", policy)
        elif route.body == "network":
            check_network_create(body or b"", policy)
        if route.scope == "network" and (not policy.network or req.ident != policy.network):
            raise Refused(403, f"network {req.ident} is not the sandbox network; the engine proxy refuses it")
        if route.scope == "list":
            check_list(req, policy)
        elif route.scope == "image" and policy.images and req.ident not in policy.images:
            raise Refused(403, f"image {req.ident} is not the sandbox image; the engine proxy refuses it")
        if not policy.sensor or route.scope not in ("container", "exec"):
            return req.target
        if route.scope == "container":
            resolved = await self._owned_container(req.ident)
        else:
            await self._owned_exec(req.ident)
            resolved = req.ident
        return req.target_with(resolved)

    async def _owned_container(self, ident: str) -> str:
        """The full id of container ``ident`` if it is labelled for this sensor; Refused otherwise."""
        if ident in self._owned and self._owned[ident] == ident:
            return ident
        status, info = await self._engine_json(f"/containers/{ident}/json")
        if status == 404:
            raise Refused(404, f"No such container: {ident}")
        if status != 200 or not isinstance(info, dict) or not isinstance(info.get("Id"), str):
            raise Refused(502, f"engine proxy: looking up container {ident} failed ({status})")
        labels = (info.get("Config") or {}).get("Labels") or {}
        if not self.policy.owns(labels):
            raise Refused(403, f"container {ident} is not labelled for sensor {self.policy.sensor}")
        self._remember(info["Id"], info["Id"])
        return str(info["Id"])

    async def _owned_exec(self, ident: str) -> None:
        if ident in self._owned:
            return
        status, info = await self._engine_json(f"/exec/{ident}/json")
        if status == 404:
            raise Refused(404, f"No such exec instance: {ident}")
        if status != 200 or not isinstance(info, dict) or not isinstance(info.get("ContainerID"), str):
            raise Refused(502, f"engine proxy: looking up exec {ident} failed ({status})")
        container = await self._owned_container(info["ContainerID"])
        self._remember(ident, container)

    def _remember(self, ident: str, container: str) -> None:
        self._owned[ident] = container
        while len(self._owned) > CACHE_SIZE:
            self._owned.popitem(last=False)

    async def _engine_json(self, path: str) -> tuple[int, Any]:
        """A GET of our own to the engine (label look-ups), bounded in time and size."""
        try:
            return await self._engine_get(path)
        except (OSError, TimeoutError, ValueError, IndexError) as exc:
            raise Refused(502, f"engine proxy: look-up of {path} failed: {exc!r}") from None

    async def _engine_get(self, path: str) -> tuple[int, Any]:
        async with asyncio.timeout(LOOKUP_TIMEOUT_S):
            r, w = await asyncio.open_unix_connection(str(self.upstream))
            try:
                w.write(f"GET {path} HTTP/1.1\r\nHost: docker\r\nConnection: close\r\n\r\n".encode())
                await w.drain()
                raw = bytearray()
                while chunk := await r.read(65536):
                    raw += chunk
                    if len(raw) > MAX_LOOKUP_BYTES:
                        raise Refused(502, "engine proxy: engine answer too large")
            finally:
                w.close()
        head, _, body = bytes(raw).partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        if any(line.lower().replace(" ", "") == "transfer-encoding:chunked" for line in lines[1:]):
            body = dechunk(body)
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, None


def dechunk(data: bytes) -> bytes:
    out = bytearray()
    while data:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            break
        out += data[:size]
        data = data[size + 2 :]
    return bytes(out)


def forward_head(req: Request, target: str, body: bytes | None, *, upgrade: bool) -> bytes:
    """The request head for the engine: hop-by-hop headers dropped, one request per connection."""
    lines = [f"{req.method} {target} {req.version}"]
    for name, value in req.headers:
        lower = name.lower()
        if lower in _HOP_BY_HOP or (body is not None and lower in ("content-length", "transfer-encoding")):
            continue
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    if upgrade and "upgrade" in (req.header("connection") or "").lower():
        lines += ["Connection: Upgrade", "Upgrade: tcp"]
    else:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_body(reader: asyncio.StreamReader, req: Request) -> bytes:
    length = req.header("content-length")
    if length is not None:
        if int(length) > MAX_BODY:
            raise Refused(413, f"request body larger than {MAX_BODY} bytes")
        return await reader.readexactly(int(length))
    if req.header("transfer-encoding") is None:
        return b""
    out = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0].strip(), 16)
        if len(out) + size > MAX_BODY:
            raise Refused(413, f"request body larger than {MAX_BODY} bytes")
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, ignored
                pass
            return bytes(out)
        out += await reader.readexactly(size)
        if await reader.readexactly(2) != b"\r\n":
            raise ValueError("chunk not followed by CRLF")


async def discard(reader: asyncio.StreamReader, max_bytes: int = 64 * 1024 * 1024, timeout_s: float = 5.0) -> None:
    """Read what a refused client still sends (a tar it is uploading) so it gets to read the answer."""
    with contextlib.suppress(TimeoutError, ConnectionError, OSError):
        async with asyncio.timeout(timeout_s):
            seen = 0
            while seen < max_bytes and (chunk := await reader.read(65536)):
                seen += len(chunk)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof() and not writer.is_closing():
        writer.write_eof()  # pass the half-close on: EOF on the exec's stdin


async def splice(
    client_r: asyncio.StreamReader,
    client_w: asyncio.StreamWriter,
    up_r: asyncio.StreamReader,
    up_w: asyncio.StreamWriter,
) -> None:
    """Bytes both ways until the engine closes its side (its answer, or the exec stream, is over)."""
    to_engine = asyncio.create_task(_pipe(client_r, up_w))
    try:
        await _pipe(up_r, client_w)
    finally:
        to_engine.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
            await to_engine


# -- command line ------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m sandtrap.sandbox.docker.proxy",
        description="Allow-list proxy for the Docker engine API (see SECURITY.md, 'Engine proxy').",
    )
    p.add_argument(
        "--listen", required=True, type=Path, help="unix socket for the honeypot (sandbox.docker.docker_host)"
    )
    p.add_argument("--upstream", default="/var/run/docker.sock", help="the engine's socket (path or unix:// URL)")
    p.add_argument("--config", "-c", default=os.environ.get("SANDTRAP_CONFIG"), help="sandtrap YAML config")
    p.add_argument("--sensor", help="only containers labelled for this sensor ('' = no label scoping)")
    p.add_argument("--image", action="append", help="allowed image (repeatable); default: sandbox.docker.image")
    p.add_argument("--mode", default="660", help="socket permissions, octal (default 660)")
    p.add_argument("--group", help="socket group (the honeypot's user must be in it)")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def _run(proxy: EngineProxy) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with proxy:
        serving = asyncio.create_task(proxy.serve_forever())
        await stop.wait()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)-7s %(name)s %(message)s")
    try:
        settings = load_settings(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    policy = Policy.from_settings(settings.sandbox.docker, settings.sandbox, settings.sensor)
    if args.sensor is not None:
        policy = policy.with_sensor(args.sensor)
    if args.image:
        policy = policy.with_images(args.image)
    else:  # every persona's image (personas[].image), the sandbox image among them
        docker = settings.sandbox.docker
        policy = policy.with_images({docker.image, *(p.image_tag(docker.image) for p in settings.effective_personas())})
    if "://" in str(args.upstream) and not str(args.upstream).startswith("unix://"):
        # A tcp:// engine is reached over mutual TLS by the honeypot itself (sandbox.docker.tls_*); this proxy
        # belongs on the engine's host, in front of its socket.
        print(f"error: --upstream {args.upstream}: the engine proxy forwards to a unix socket only; run it on the "
              "engine's host, in front of its socket", file=sys.stderr)  # fmt: skip
        return 2
    upstream = Path(str(args.upstream).removeprefix("unix://"))
    proxy = EngineProxy(args.listen, upstream, policy, int(args.mode, 8), args.group)
    asyncio.run(_run(proxy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
