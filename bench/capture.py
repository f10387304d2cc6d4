"""Capture bench (issue 16): a box's 20 MB download through the capture gateway, with and without the session's
pcap, side by side in one run, and the fetcher alone.

    python -m bench.capture [--quick] [--image TAG]

Two honeypots in this process on 127.0.0.1 (unique sensors, so two gateway namespaces), ``network.mode:
capture`` with ``egress.fetch: true``, one with ``network.pcap.enabled`` and one without. The "internet" is a
file server in a child process (``python -m http.server`` on 127.0.0.1, named through ``egress.hosts`` and
allowed by ``egress.allow``), so this process's CPU time is the honeypot's: the gateway's accept and HTTP
parsing, the fetcher, the copy to the box, the pcap (when on) and the artifact store, plus the SSH session
around the ``wget`` (a few KB). Rounds alternate between the two (and which goes first), so the load falls on both.
"Fetcher alone" is :class:`Fetcher` fetching the same URL in this process (no box, no gateway). Writes
bench/results/capture.md and capture.json (--quick: bench/.work/quick/).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import asyncssh

from sandtrap.app import running
from sandtrap.config import EgressSettings, load_settings
from sandtrap.network.fetcher import Fetcher
from sandtrap.sandbox.docker import seccomp

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = secrets.token_hex(8)
NAME = "dl.bench-capture.com"
SIZE = 20 * 1024 * 1024


def settings_for(tmp: Path, image: str, pcap: bool, index: int) -> Any:
    sensor = f"bench-cap-{secrets.token_hex(4)}"
    settings = load_settings(
        None,
        {
            "sensor": sensor,
            "ssh": {"listen": "127.0.0.1:0"},
            "sandbox": {"docker": {"image": image}, "pool_size": 1},
            "storage": {"data_dir": str(tmp / f"data-{index}")},
            "api": {"listen": "127.0.0.1:0"},
            "auth": {"credentials": [{"username": "root", "password": PASSWORD}], "accept_all_after": 0,
                     "failure_delay_s": 0, "success_delay_s": 0},
            "limits": {"max_sessions_per_ip": 50},
            "network": {"mode": "capture", "subnet": f"10.20.{90 + index}.0/24",
                        "pcap": {"enabled": pcap, "max_bytes": "64m"},
                        "egress": {"fetch": True, "allow": ["127.0.0.1/32"], "hosts": {NAME: "127.0.0.1"},
                                   "max_file_bytes": "32m", "max_session_bytes": "1g", "max_fetches": 1000}},
        },
    )  # fmt: skip
    made = seccomp.profile_path(ROOT / "data")
    if made.exists():
        seccomp.profile_path(settings.data_dir).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(made, seccomp.profile_path(settings.data_dir))
    return settings


async def download(conn: asyncssh.SSHClientConnection, url: str) -> tuple[float, float]:
    """(MB/s, honeypot CPU ms per MB) of one wget in the box."""
    cpu, wall = time.process_time(), time.perf_counter()
    result = await asyncio.wait_for(conn.run(f"wget -q -O /tmp/big {url} && stat -c %s /tmp/big", check=True), 300)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert str(result.stdout).strip() == str(SIZE), result.stdout
    mb = SIZE / 1e6
    return mb / wall, cpu / mb * 1000


async def main(quick: bool, image: str) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="sandtrap-bench-capture-"))
    (tmp / "www").mkdir()
    (tmp / "www" / "20m").write_bytes(secrets.token_bytes(SIZE))
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "0", "--directory", str(tmp / "www"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    assert server.stdout is not None
    line = (await asyncio.wait_for(server.stdout.readline(), 30)).decode()  # "Serving HTTP on 127.0.0.1 port N ..."
    port = int(line.split(" port ")[1].split()[0])
    url = f"http://{NAME}:{port}/20m"
    rounds = 1 if quick else 5
    res: dict[str, Any] = {"quick": quick, "size_bytes": SIZE, "rounds": rounds}
    sensors = []
    try:
        fetcher = Fetcher(EgressSettings(allow=["127.0.0.1/32"], hosts={NAME: "127.0.0.1"}, max_file_bytes=32 << 20))
        alone = []
        for _ in range(rounds):
            cpu, wall = time.process_time(), time.perf_counter()
            got = await fetcher.fetch("GET", url, {}, 32 << 20)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            assert len(got.body) == SIZE
            alone.append((SIZE / 1e6 / wall, cpu / (SIZE / 1e6) * 1000))
        res["fetcher_alone"] = alone
        async with AsyncExitStack() as stack:
            conns = {}
            for index, pcap in enumerate((True, False)):
                settings = settings_for(tmp, image, pcap, index)
                sensors.append(settings.sensor)
                svc = await stack.enter_async_context(running(settings))
                conns[pcap] = await stack.enter_async_context(
                    asyncssh.connect("127.0.0.1", svc.ssh.port, username="root", password=PASSWORD,
                                     known_hosts=None, client_keys=None, agent_path=None, config=[])
                )  # fmt: skip
                await conns[pcap].run("true")  # the box leased, its capture open
            samples: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
            for n in range(rounds):
                for pcap in (True, False) if n % 2 == 0 else (False, True):  # neither always goes first
                    samples[pcap].append(await download(conns[pcap], url))
                    print(f"  pcap {'on ' if pcap else 'off'}: {samples[pcap][-1][0]:.1f} MB/s", flush=True)
            res["pcap_on"], res["pcap_off"] = samples[True], samples[False]
    finally:
        server.terminate()
        await server.wait()
        for sensor in sensors:
            proc = await asyncio.create_subprocess_exec(
                "sh", "-c", f"docker ps -aq --filter label=sandtrap.sensor={sensor} | xargs -r docker rm -f",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)  # fmt: skip
            await proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return res


def table(res: dict[str, Any]) -> str:
    def med(key: str, i: int) -> float:
        return statistics.median(x[i] for x in res[key])

    lines = [
        f"20 MB, {res['rounds']} round(s) each, medians; CPU: this process (the honeypot) per MB.",
        "",
        "| measure | MB/s | CPU ms per MB |",
        "|---|---|---|",
        f"| a box's wget through the gateway, pcap on | {med('pcap_on', 0):.1f} | {med('pcap_on', 1):.1f} |",
        f"| a box's wget through the gateway, pcap off | {med('pcap_off', 0):.1f} | {med('pcap_off', 1):.1f} |",
        f"| the fetcher alone (no box) | {med('fetcher_alone', 0):.1f} | {med('fetcher_alone', 1):.1f} |",
        "",
        f"pcap's cost: {med('pcap_on', 1) - med('pcap_off', 1):+.1f} ms CPU per MB, "
        f"throughput {med('pcap_on', 0) / med('pcap_off', 0):.2f}x of without.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    ap = argparse.ArgumentParser(prog="python -m bench.capture", description=__doc__)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--image", default="sandtrap-target:latest")
    args = ap.parse_args()
    result = asyncio.run(main(args.quick, args.image))
    out = ROOT / "bench" / (".work/quick" if args.quick else "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "capture.json").write_text(json.dumps(result, indent=1))
    text = table(result)
    stamp = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    (out / "capture.md").write_text(f"# capture bench ({stamp})\n\n" + text)
    print(text)
