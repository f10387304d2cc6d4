"""Services bench (issue 17): telnet login -> prompt, and a raw TCP service's throughput and latency against a
direct connection to the same port of the same box.

    python -m bench.services [--quick] [--image TAG]

Runs a honeypot in this process on 127.0.0.1 (random ports) with an ssh, a telnet and a tcp service (target
port 9000), the image as `make setup` built it, a unique sensor name; its containers are removed at the end.
In the attacker's box an echo/sink server listens on 127.0.0.1:9000 (started over SSH). "direct" is a socket
made in the box's network namespace by the backend (BoxPorts.open_port), the floor under the proxy: what the
proxy adds is the honeypot's accept, the per-connection record (stream file, pcap) and the copy.
Writes bench/results/services.md and services.json (--quick: bench/.work/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncssh

from sandtrap.app import running
from sandtrap.config import load_settings
from sandtrap.sandbox.base import BoxPorts, ClientAddress
from sandtrap.sandbox.docker import seccomp
from sandtrap.telnet import protocol as tp

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = secrets.token_hex(8)
SERVER = (
    "import socket,threading\n"
    "s=socket.socket();s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1);s.bind(('127.0.0.1',9000));s.listen(64)\n"
    "def h(c):\n"
    " m=c.recv(1)\n"
    " if m==b'e':\n"
    "  while True:\n"
    "   d=c.recv(65536)\n"
    "   if not d: break\n"
    "   c.sendall(d)\n"
    " else:\n"
    "  n=0\n"
    "  while True:\n"
    "   d=c.recv(262144)\n"
    "   if not d: break\n"
    "   n+=len(d)\n"
    "  c.sendall(str(n).encode())\n"
    " c.close()\n"
    "while True:\n"
    " c,a=s.accept();threading.Thread(target=h,args=(c,),daemon=True).start()\n"
)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def telnet_login(port: int) -> tuple[float, float]:
    """Seconds from connect to 'login:', and from the password's Enter to the shell prompt."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    parser = tp.Parser(crlf=False)
    buf = b""

    async def until(needle: bytes) -> None:
        nonlocal buf
        while needle not in buf:
            chunk = await reader.read(4096)
            if not chunk:
                raise EOFError(buf)
            for item in parser.feed(chunk):
                if isinstance(item, tp.Command) and item.verb in (tp.DO, tp.WILL):  # a terse client: says no
                    writer.write(bytes([tp.IAC, tp.WONT if item.verb == tp.DO else tp.DONT, item.option]))
                elif isinstance(item, tp.Data):
                    buf += item.data
        buf = buf[buf.index(needle) + len(needle) :]

    try:
        async with asyncio.timeout(60):
            await until(b"login: ")
            t_prompt = time.perf_counter() - t0
            writer.write(b"root\r\n")
            await until(b"Password: ")
            writer.write(PASSWORD.encode() + b"\r\n")
            t1 = time.perf_counter()
            await until(b"# ")
            t_shell = time.perf_counter() - t1
            writer.write(b"exit\r\n")
            await writer.drain()
            while await reader.read(4096):
                pass
    finally:
        writer.close()
    return t_prompt, t_shell


async def open_stream(via: str, port: int, box: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if via == "proxy":
        return await asyncio.open_connection("127.0.0.1", port)
    sock = await box.open_port(9000, "tcp", ClientAddress("127.0.0.1", 0, "127.0.0.1"))
    return await asyncio.open_connection(sock=sock)


async def throughput(via: str, port: int, box: Any, size: int) -> float:
    reader, writer = await open_stream(via, port, box)
    block = b"Z" * 262144
    t0 = time.perf_counter()
    writer.write(b"s")
    sent = 0
    while sent < size:
        writer.write(block)
        sent += len(block)
        await writer.drain()
    writer.write_eof()
    answer = await reader.read()
    elapsed = time.perf_counter() - t0
    writer.close()
    assert int(answer) == sent, (answer, sent)
    return sent / elapsed / 1e6


async def latency(via: str, port: int, box: Any, n: int) -> list[float]:
    reader, writer = await open_stream(via, port, box)
    writer.write(b"e")
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        writer.write(b"x")
        await writer.drain()
        await reader.readexactly(1)
        out.append((time.perf_counter() - t0) * 1000)
    writer.close()
    return out


async def connect_time(via: str, port: int, box: Any, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        reader, writer = await open_stream(via, port, box)
        writer.write(b"e1")
        await reader.readexactly(1)
        out.append((time.perf_counter() - t0) * 1000)
        writer.close()
    return out


async def main(quick: bool, image: str, capture: bool = True) -> dict[str, Any]:
    sensor = f"bench-svc-{secrets.token_hex(4)}"
    tmp = Path(tempfile.mkdtemp(prefix="sandtrap-bench-services-"))
    settings = load_settings(
        None,
        {
            "sensor": sensor,
            "services": [
                {"name": "ssh", "protocol": "ssh", "listen": "127.0.0.1:0"},
                {"name": "telnet", "protocol": "telnet", "listen": "127.0.0.1:0"},
                {"name": "echo", "protocol": "tcp", "listen": "127.0.0.1:0", "target_port": 9000,
                 "capture": {"pcap": capture, "metadata": capture}},
            ],
            "sandbox": {"docker": {"image": image}, "pool_size": 2},
            "storage": {"data_dir": str(tmp / "data")},
            "api": {"listen": "127.0.0.1:0"},
            "auth": {"credentials": [{"username": "root", "password": PASSWORD}], "accept_all_after": 0,
                     "failure_delay_s": 0, "success_delay_s": 0},
            "limits": {"max_sessions_per_ip": 50},
        },
    )  # fmt: skip
    made = seccomp.profile_path(ROOT / "data")
    if made.exists():
        seccomp.profile_path(settings.data_dir).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, seccomp.profile_path(settings.data_dir))
    n_login, n_lat, size = (5, 100, 20 * 2**20) if quick else (30, 1000, 200 * 2**20)
    res: dict[str, Any] = {"quick": quick, "sensor": sensor, "capture": capture}
    try:
        async with running(settings) as svc:
            tport, eport = svc.port("telnet"), svc.port("echo")
            logins = [await telnet_login(tport) for _ in range(n_login)]
            res["telnet_connect_to_login_prompt_ms"] = [a * 1000 for a, _ in logins]
            res["telnet_password_to_shell_prompt_ms"] = [b * 1000 for _, b in logins]
            # The IP's box: SSH in, start the echo/sink server; its lease is the one the tcp service uses.
            async with asyncssh.connect("127.0.0.1", svc.ssh.port, username="root", password=PASSWORD,
                                        known_hosts=None, client_keys=None, agent_path=None, config=[]) as c:  # fmt: skip
                await c.run(f'nohup python3 -c "{SERVER}" >/dev/null 2>&1 &', check=False)
                await asyncio.sleep(1.0)
                box = next(iter(svc.manager._by_ip.values())).sandbox  # the IP's box (bench only)
                assert isinstance(box, BoxPorts)
                for via in ("direct", "proxy"):
                    res[f"{via}_throughput_MBps"] = [await throughput(via, eport, box, size) for _ in range(3)]
                    res[f"{via}_rtt_ms"] = await latency(via, eport, box, n_lat)
                    res[f"{via}_connect_ms"] = await connect_time(via, eport, box, 20 if quick else 100)
    finally:
        proc = await asyncio.create_subprocess_exec(
            "sh", "-c", f"docker ps -aq --filter label=sandtrap.sensor={sensor} | xargs -r docker rm -f",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
        await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def table(res: dict[str, Any]) -> str:
    def row(name: str, xs: list[float], unit: str) -> str:
        return f"| {name} | {statistics.median(xs):.2f} {unit} | {pct(xs, 95):.2f} {unit} | {len(xs)} |"

    lines = [
        "| measure | median | p95 | n |",
        "|---|---|---|---|",
        row("telnet: connect to `login:`", res["telnet_connect_to_login_prompt_ms"], "ms"),
        row("telnet: password Enter to shell prompt", res["telnet_password_to_shell_prompt_ms"], "ms"),
    ]
    for via in ("direct", "proxy"):
        lines.append(row(f"tcp {via}: throughput (host → box sink)", res[f"{via}_throughput_MBps"], "MB/s"))
        lines.append(row(f"tcp {via}: 1-byte echo round trip", res[f"{via}_rtt_ms"], "ms"))
        lines.append(row(f"tcp {via}: connect + first echo", res[f"{via}_connect_ms"], "ms"))
    ratio = statistics.median(res["proxy_throughput_MBps"]) / statistics.median(res["direct_throughput_MBps"])
    lines.append(f"\nproxy/direct throughput: {ratio:.2f}x; round trip +"
                 f"{statistics.median(res['proxy_rtt_ms']) - statistics.median(res['direct_rtt_ms']):.3f} ms")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.services", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--image", default="sandtrap-target:latest")
    ap.add_argument("--no-capture", action="store_true", help="the tcp service without stream file and pcap")
    args = ap.parse_args()
    result = asyncio.run(main(args.quick, args.image, not args.no_capture))
    out = ROOT / "bench" / (".work/quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-nocapture" if args.no_capture else ""
    (out / f"services{suffix}.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    (out / f"services{suffix}.md").write_text(f"# services bench ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})\n\n"
                                     + text)  # fmt: skip
    print(text)
